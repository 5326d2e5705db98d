"""The interactive explorer: its controls cover the trace, and each choice shows the right stage."""
from matplotlib.figure import Figure
from rich.console import Group

from trace import Capture, traced_run
from trace.explorer import explorer, view


def test_each_choice_shows_that_stage_and_its_figure(tiny):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=3, capture=Capture.everything())
    detail, figure = view(trace, stage=13, step=2, layer=1, head=3, figure=True)
    assert isinstance(detail, Group) and isinstance(figure, Figure)
    assert "Stage 13" in str(detail.renderables[0].title) and "step 2" in str(detail.renderables[0].where)
    assert view(trace, stage=4, step=0, layer=0, head=0, figure=False)[0].renderables[0].title.startswith("Stage 4")


def test_a_choice_without_kept_values_says_why(tiny):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=3)  # values of step 0, layer 0 only
    _, note = view(trace, stage=17, step=2, layer=1, head=0, figure=True)
    assert note.startswith("No figure: the trace kept no values of stage 17")


def test_controls_cover_the_trace(tiny):
    model, _ = tiny
    trace = traced_run(model, "the cat", chat=False, max_new_tokens=3, capture=Capture.everything())
    box = explorer(trace)
    (stage, step, figure), (layer, head) = box.children[0].children, box.children[1].children
    assert len(stage.options) == 19 and stage.value == 13 and figure.value
    assert (step.max, layer.max, head.max) == (trace.n_steps - 1, model.config.n_layers - 1, model.config.n_heads - 1)
    stage.value, step.value = 10, 2  # changing a control redraws without error
