"""Stages 1 and 2: from the prompt to the tokens tensor."""
import torch

from .hooks import record
from .tokenizer import Tokenizer


def tokenize(tokenizer: Tokenizer, prompt: str, chat: bool, system: str | None = None) -> list[int]:
    """Stage 1. prompt (str) -> token ids (T0). With `chat`, the chat template wraps the
    prompt (and the system prompt, if given) first: the template brings its own special tokens,
    so no extra BOS."""
    if chat:
        ids = tokenizer.encode(tokenizer.apply_chat_template(prompt, system), add_bos=False)
    else:
        ids = tokenizer.encode(prompt, add_bos=tokenizer.add_bos)
    record(1, "token ids", torch.tensor(ids, dtype=torch.long))
    return ids


def stand_in_prompt(n_tokens: int) -> list[int]:
    """Stage 1 where no tokenizer is at hand (shapes only): n_tokens ids of 0 stand in for a
    prompt of that length."""
    ids = [0] * n_tokens
    record(1, "token ids", torch.tensor(ids, dtype=torch.long))
    return ids


def create_tokens_tensor(token_ids: list[int], max_len: int, pad_id: int, device) -> torch.Tensor:
    """Stage 2. token ids (T0) -> tokens (S): the ids, then pad_id up to S = max_len."""
    ids = record(2, "token ids", torch.tensor(token_ids, dtype=torch.long, device=device))
    tokens = torch.full((max_len,), pad_id, dtype=torch.long, device=device)
    tokens[: len(token_ids)] = ids
    # The loop writes into `tokens` later: keep a snapshot of it as it is now.
    return record(2, "tokens", tokens, copy=True)
