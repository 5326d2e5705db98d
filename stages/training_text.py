"""The short text that `python -m trace train` learns from when it is given none: plain English,
written for this project, long enough for several batches of the default size."""

DEFAULT_TEXT = """\
A language model reads text as a stream of tokens. Each token is a small piece of a word, a whole word, \
a space or a mark of punctuation, and each piece has a number of its own in the model's vocabulary. \
Before training, the stream is cut into rows of the same length, and a few rows are stacked into a batch. \
The model sees every row at once and guesses, at every position, which token comes next. \
The right answer is already written in the text: it is the token one place further along.

At the start of training, the guesses are poor. The model gives some probability to every token of its \
vocabulary, and the token that really comes next may get very little of it. The loss measures how \
surprised the model was: minus the logarithm of the probability it gave to the right token, averaged \
over every position of the batch. A model that guesses well has a small loss; a model that guesses at \
random pays the logarithm of the size of its vocabulary.

Backpropagation then asks, for every number in the model, how the loss would change if that number \
changed a little. The answer is the gradient. It flows backwards from the loss, through the output head, \
through the last block and every block before it, down to the table of embeddings at the very beginning. \
The residual stream carries it from block to block, just as it carried the activations forward.

The optimizer turns gradients into changes. Plain gradient descent would move every weight a small step \
against its gradient. AdamW keeps two running averages for each weight: the mean of its recent gradients \
and the mean of their squares. It moves each weight by the first divided by the square root of the second, \
so that weights with noisy gradients move carefully and weights with steady gradients move with \
confidence. It also shrinks every weight a little towards zero, which is the weight decay.

After the update, the same batch would get a slightly smaller loss. Over many batches and many steps, \
the small changes add up. The model learns which words tend to follow which, how sentences are built, \
which facts go together, and how a question is usually answered. Nothing in the model is told these \
things directly; they are what makes the next token easier to guess.

The river left the mountains in early spring, when the snow began to melt. It ran quickly at first, over \
stones and under fallen trees, and then more slowly through the wide valley where the farms were. In the \
evenings the farmers walked down to the water and watched the light fade behind the hills. The children \
threw small stones into the current and counted the rings on the surface until they disappeared.

In the town by the river there was a library with tall windows. Every morning the librarian opened the \
doors, put the returned books back on their shelves and wrote the date on a small card. Students came to \
read in the afternoon, and an old man came every day at four o'clock to read the newspaper. When it \
rained, more people came, and the room was quiet except for the sound of pages and of water on the glass.

A good teacher explains one idea at a time and shows it with an example before moving on. The example \
should be small enough to follow with a pencil and real enough to be worth following. When the student \
can predict what comes next, the lesson has worked; when the prediction fails, the mistake shows \
exactly where to look again. Learning, for people and for models, is the slow work of making better \
predictions.
"""
