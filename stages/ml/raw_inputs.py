"""A network together with its signed input preprocessing: it takes rows as the user has them.

``RawInputModel(net, spec)`` applies a ``stages.data.preprocessing`` spec before the
network. Images: float32 on [0, 1] pass unchanged (N x C x H x W, or N x H x W for one
channel); uint8 pixels are divided by 255 (uint16 by 65535); channels-last batches
(N x H x W x C) are transposed. Tables: raw rows in the user's units; a float tensor of a
table whose columns are all numeric goes through the same scaling in torch (so gradients
reach the raw inputs); anything else (a pandas DataFrame, a list of dicts, an array with
category text) goes through the numpy functions of the spec. ``net`` is the network on
the scaled features, which is what the evaluation attacks (epsilons on the scaled scale).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from stages.core.errors import InvalidInput
from stages.data.preprocessing import apply_table_preprocessing, check_spec, table_values


class RawInputModel(nn.Module):
    """``net`` behind the preprocessing ``spec``; returns logits over the class list."""

    def __init__(self, net: nn.Module, spec: Mapping[str, Any]):
        super().__init__()
        self.net = net
        self.spec = dict(spec)
        self.kind = self.spec.get("kind")
        if self.kind == "table":
            check_spec(self.spec)
            columns = self.spec["columns"]
            self.numeric_only = all(c["type"] == "numeric" for c in columns)
            if self.numeric_only:
                low = torch.tensor([c["low"] for c in columns], dtype=torch.float32)
                span = torch.tensor([c["high"] - c["low"] for c in columns], dtype=torch.float32)
                fill = torch.tensor([c.get("fill", float("nan")) for c in columns], dtype=torch.float32)
                self.register_buffer("low", low, persistent=False)
                self.register_buffer("inv_span", torch.where(span > 0, 1.0 / span, torch.ones_like(span)), persistent=False)
                self.register_buffer("fill", fill, persistent=False)
        elif self.kind == "image":
            self.input_shape = tuple(int(d) for d in self.spec["input_shape"])
        else:
            raise InvalidInput(f"unknown preprocessing kind {self.kind!r}")

    def _device(self) -> torch.device:
        return next(self.net.parameters()).device

    def _image(self, x: Any) -> Tensor:
        if not isinstance(x, Tensor):
            x = torch.from_numpy(np.ascontiguousarray(np.asarray(x)))
        c, h, w = self.input_shape
        if x.dtype == torch.uint8:
            x = x.float() / 255.0
        elif x.dtype == torch.uint16:
            x = x.float() / 65535.0
        elif not x.is_floating_point():
            raise InvalidInput(f"images must be uint8 pixels or floats on [0, 1], got {x.dtype}")
        if x.ndim == 3 and c == 1 and tuple(x.shape[1:]) == (h, w):
            x = x.unsqueeze(1)
        elif x.ndim == 4 and tuple(x.shape[1:]) == (h, w, c) and (h, w, c) != (c, h, w):
            x = x.permute(0, 3, 1, 2)
        elif x.ndim == 2 and x.shape[1] == c * h * w:
            x = x.reshape(len(x), c, h, w)
        if x.ndim != 4 or tuple(x.shape[1:]) != (c, h, w):
            raise InvalidInput(f"images must be N x {c} x {h} x {w} (or N x {h} x {w} x {c}), got shape {tuple(x.shape)}")
        return x.to(torch.float32)

    def _table(self, x: Any) -> Tensor:
        if isinstance(x, Tensor) and self.numeric_only and x.is_floating_point():
            if x.ndim != 2 or x.shape[1] != len(self.low):
                raise InvalidInput(f"rows must be N x {len(self.low)}, got shape {tuple(x.shape)}")
            x = x.to(torch.float32)
            gaps = torch.isnan(x)
            if bool(gaps.any()):
                if self.spec["missing"] != "impute":
                    rows = torch.nonzero(gaps.any(dim=1)).flatten()[:5].tolist()
                    raise InvalidInput(f"rows {rows} have missing values and the model was trained with data.missing=refuse")
                x = torch.where(gaps, self.fill.to(x.device).expand_as(x), x)
            return torch.clamp((x - self.low.to(x.device)) * self.inv_span.to(x.device), 0.0, 1.0)
        if isinstance(x, Tensor):
            x = x.detach().cpu().numpy()
        return torch.from_numpy(apply_table_preprocessing(table_values(x, self.spec), self.spec))

    def prepare(self, x: Any) -> Tensor:
        """The network's input (float32 on [0, 1]) from rows as the caller has them."""
        prepared = self._image(x) if self.kind == "image" else self._table(x)
        return prepared.to(self._device())

    def features_of(self, x: Any) -> Tensor:
        return self.net.features_of(self.prepare(x))

    def forward(self, x: Any) -> Tensor:
        return self.net(self.prepare(x))
