"""A model holding given weights: built without allocating and initialising its own first, the weights' keys as the
plain module names them, a mismatch named in one line. checkpoint.py and hf.py read the weights from files;
model.py does no file I/O.
"""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from common import CheckpointError
from model import GPT, GPTConfig


def strip_wrapper_prefixes(state_dict: dict) -> dict:
    """Keys as the plain module names them: torch.compile adds `_orig_mod.`, DDP adds `module.`, in any
    order and nesting (DDP around a compiled model gives `module._orig_mod.`)."""
    prefixes = ("_orig_mod.", "module.")
    out = {}
    for k, v in state_dict.items():
        while k.startswith(prefixes):
            k = k.split(".", 1)[1]
        out[k] = v
    return out


def parameter_counts(config: GPTConfig) -> tuple[int, int]:
    """GPT(config).num_params() and num_params(non_embedding=True), without allocating or initialising it."""
    with torch.device("meta"), _skip_init():
        model = GPT(config)
    return model.num_params(), model.num_params(non_embedding=True)


def model_with_weights(config: GPTConfig, state_dict: dict) -> GPT:
    """A model holding exactly these weights, built without first allocating and initialising its own."""
    with torch.device("meta"), _skip_init():  # no memory, no random init: every weight comes from state_dict
        model = GPT(config)
    load_state(model, state_dict, assign=True)
    if config.tie_embeddings:
        model.lm_head.weight = model.transformer.wte.weight  # assign replaced both tensors: tie them again
    return model


@contextlib.contextmanager
def _skip_init():
    """torch.nn.init's initialisers as no-ops, for a model built only to receive loaded weights.

    On meta tensors normal_ runs a Python reference kernel whose first call imports torch._dynamo:
    about 3.7 s of sample.py's start-up, for values that would be thrown away. transformers' loading
    (`no_init_weights`) skips them the same way.
    """
    names = [n for n in dir(nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(nn.init, n) for n in names}
    try:
        for n in names:
            setattr(nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(nn.init, n, f)


def load_state(model: GPT, state_dict: dict, assign: bool = False) -> None:
    """load_state_dict, strict, with the mismatch named in one line rather than a wall of keys."""
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit the model: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                              f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
    try:
        model.load_state_dict(state_dict, strict=True, assign=assign)
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit the model: {str(e).splitlines()[-1].strip()}") from None
