"""What the frozen text conditioners share: a model kept out of the state_dict, an LRU cache
of embeddings, and loading without the network."""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from n2a_core import Conditioner


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Hugging Face Hub in offline mode for the duration: cached files only, no request made.

    huggingface_hub reads HF_HUB_OFFLINE once at import, so its module flag is set too.
    """
    import huggingface_hub.constants as hub_constants
    from transformers.utils import logging as hf_logging

    saved_env, saved_flag = os.environ.get("HF_HUB_OFFLINE"), hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"], hub_constants.HF_HUB_OFFLINE = "1", True
    # A weight-loading progress bar per model load only clutters n2a's own progress bars.
    bars_were_on, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars_were_on:
            hf_logging.enable_progress_bar()
        hub_constants.HF_HUB_OFFLINE = saved_flag
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


class FrozenTextConditioner(Conditioner):
    """A caption conditioner around a frozen text model.

    The model is held in a plain attribute, not as a submodule: it is not trained, so it
    stays out of `parameters()` and `state_dict()` (checkpoints reload it from its path),
    yet `.to(device)` moves it (`_apply`). Subclasses implement `_load()` and `_encode()`.
    Embeddings are cached per caption (LRU, `cache_size` entries) so the model runs once
    per distinct caption; the cache is emptied when the module moves.
    """

    field = "caption"

    def __init__(self, cache_size: int = 4096):
        super().__init__()
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        # Gives the module a device (Conditioner.device reads buffers); not saved.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)
        object.__setattr__(self, "_model", None)

    # -- subclass hooks ---------------------------------------------------------------
    def _load(self) -> Any:
        """The frozen model, on `self.device`."""
        raise NotImplementedError

    def _encode(self, model: Any, texts: list[str]) -> torch.Tensor:
        """Distinct texts -> N x D or N x L x D on `self.device` (no gradients needed)."""
        raise NotImplementedError

    # -- shared machinery -------------------------------------------------------------
    @property
    def model(self) -> Any:
        if self._model is None:
            model = self._load()
            if isinstance(model, torch.nn.Module):
                model.eval().requires_grad_(False)
            object.__setattr__(self, "_model", model)
        return self._model

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if isinstance(self._model, torch.nn.Module):
            self._model._apply(fn)
        self._cache.clear()
        return self

    def embed(self, conditions: Sequence[str]) -> torch.Tensor:
        conditions = [str(c) for c in conditions]
        found = {c: self._cache[c] for c in conditions if c in self._cache}
        missing = [c for c in dict.fromkeys(conditions) if c not in found]
        if missing:
            with torch.no_grad():
                rows = self._encode(self.model, missing).float()
            found.update(zip(missing, rows, strict=True))
        for c in dict.fromkeys(conditions):
            self._cache[c] = found[c]
            self._cache.move_to_end(c)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        # A fresh tensor: rows made under inference_mode (sentence-transformers) could not be
        # saved for backward when a trained layer consumes them; the stacked copy can.
        return torch.stack([found[c] for c in conditions])
