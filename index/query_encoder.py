"""One query at a time on the CPU: the sentence-transformers encoder run by ONNX Runtime.

A hybrid query encodes one short text. PyTorch's eager mode spends most of that on per-operator
overhead: all-MiniLM-L6-v2 takes about 25 ms of CPU for a 22-token query on this machine, the
same graph in ONNX Runtime (fused attention, GELU and layer norm) about 11 ms, with the same
vector (largest difference 2e-7). Documents are still encoded in batches by sentence-transformers.

The transformer is exported once per encoder into its embedding cache directory
(`query_encoder.onnx`, written to a temporary name and renamed, so concurrent exports are safe).
Only the pipelines we can reproduce exactly are exported: Transformer -> Pooling (mean or cls)
-> optional Normalize. Anything else, or a failed export, keeps the PyTorch path; `backend`
says which one a searcher uses.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import numpy as np

ONNX_FILE = "query_encoder.onnx"
POOLING_MODES = ("mean", "cls")


def _pipeline(st) -> tuple[object, str, bool] | None:
    """(transformer module, pooling mode, normalize) when the model is a plain text pipeline."""
    modules = list(st)
    names = [type(m).__name__ for m in modules]
    if names not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        return None
    mode = getattr(modules[1], "pooling_mode", None)
    if mode not in POOLING_MODES:
        return None
    return modules[0], mode, len(modules) == 3


def _features(st, text: str) -> dict[str, np.ndarray]:
    prepare = getattr(st, "preprocess", None) or st.tokenize  # sentence-transformers 6 renamed it
    features = prepare([text])
    return {k: v.numpy().astype(np.int64) for k, v in features.items() if hasattr(v, "numpy")}


def _rust_tokenizer(st):
    """The model's Rust tokenizer, truncating like sentence-transformers, or None.

    Calling it directly takes ≈ 0.1 ms per query against ≈ 0.4 ms through `st.preprocess`
    (batch padding, tensors); `OnnxQueryEncoder` uses it only after checking it gives the same ids."""
    transformer = _pipeline(st)[0]
    backend = getattr(getattr(transformer, "tokenizer", None), "backend_tokenizer", None)
    if backend is None or getattr(transformer, "do_lower_case", False) or not transformer.max_seq_length:
        return None
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(backend.to_str())  # a copy: the model's own stays as configured
    tokenizer.no_padding()
    tokenizer.enable_truncation(transformer.max_seq_length)
    return tokenizer


def export(st, path: Path) -> None:
    """The transformer's last hidden state for one text (batch 1, any length) as an ONNX graph.

    Batch 1 means no padding: the tracer's warnings about the mask code it folds into constants
    are expected, and silenced."""
    import warnings

    import torch

    transformer = _pipeline(st)[0]
    model = transformer.auto_model.eval()
    names = list(_features(st, "an example query"))

    class HiddenStates(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, *inputs):
            return self.model(**dict(zip(names, inputs))).last_hidden_state

    example = tuple(torch.from_numpy(v) for v in _features(st, "an example query").values())
    axes = {name: {1: "tokens"} for name in names}
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(HiddenStates(), example, str(tmp), input_names=names, output_names=["hidden"],
                              dynamic_axes={**axes, "hidden": {1: "tokens"}}, opset_version=17, dynamo=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class OnnxQueryEncoder:
    """encode(text) -> (1, dim) float32, equal to the sentence-transformers model's vector."""

    backend = "onnx"

    def __init__(self, st, path: Path, threads: int = 1):
        import onnxruntime as ort

        _, self.pooling, self.normalize = _pipeline(st)
        self.st = st
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # one: the Lucene search runs on the other core meanwhile
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]
        self.tokenizer = _rust_tokenizer(st)
        probes = ["Why is the sky blue? Explain like I'm five.", "[WP] tl;dr " * 200]  # one past the limit
        if self.tokenizer is not None and not all(self._same_ids(p) for p in probes):
            self.tokenizer = None

    def _same_ids(self, text: str) -> bool:
        ours, theirs = self.features(text), _features(self.st, text)
        return all(np.array_equal(ours[name], theirs[name]) for name in self.inputs)

    def features(self, text: str) -> dict[str, np.ndarray]:
        if self.tokenizer is None:
            return _features(self.st, text)
        encoding = self.tokenizer.encode(text)
        columns = {"input_ids": encoding.ids, "attention_mask": encoding.attention_mask,
                   "token_type_ids": encoding.type_ids}
        return {name: np.array([columns[name]], dtype=np.int64) for name in self.inputs}

    def run(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """The transformer alone: ONNX Runtime releases the GIL for all of it, so another thread
        can call it while this one works (see index.query.ActSearcher)."""
        return self.session.run(None, {name: features[name] for name in self.inputs})[0]

    def pool(self, hidden: np.ndarray, features: dict[str, np.ndarray]) -> np.ndarray:
        if self.pooling == "cls":
            vector = hidden[:, 0]
        else:
            mask = features["attention_mask"][..., None].astype(np.float32)
            vector = (hidden * mask).sum(axis=1) / np.maximum(mask.sum(axis=1), 1e-9)
        if self.normalize:
            vector = vector / np.maximum(np.linalg.norm(vector, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vector, dtype=np.float32)

    def encode(self, text: str) -> np.ndarray:
        features = self.features(text)
        return self.pool(self.run(features), features)


def onnx_query_encoder(st, cache_dir: Path) -> tuple[OnnxQueryEncoder | None, str]:
    """(the ONNX encoder for `st`, exported into `cache_dir` on first use, or None; why not).

    Before it is used, the ONNX vector of a probe text is checked against sentence-transformers'
    own (a stale export for a model changed in place fails the check)."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return None, "onnxruntime is not installed"
    if _pipeline(st) is None:
        return None, "not a Transformer -> Pooling(mean|cls) -> Normalize pipeline"
    path = Path(cache_dir) / ONNX_FILE
    try:
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            export(st, path)
        encoder = OnnxQueryEncoder(st, path)
        probe = "why is the sky blue? explain like I'm five"
        expected = st.encode([probe], normalize_embeddings=encoder.normalize, convert_to_numpy=True)
        if not np.allclose(encoder.encode(probe), expected, atol=1e-4):
            return None, f"{path} does not reproduce the model's vectors (delete it to re-export)"
        return encoder, "exact to 1e-4 on a probe text"
    except Exception as exc:  # an architecture the exporter or runtime does not cover: PyTorch answers
        return None, f"ONNX export/load failed: {type(exc).__name__}: {exc}"
