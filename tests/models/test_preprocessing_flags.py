"""`--preprocessing KEY=VALUE`, and reading an ONNX graph's own normalisation (insightface model zoo rule)."""

import numpy as np
import pytest

from facegen.jobs.embedder_options import PREPROCESSING_KEYS as CLI_KEYS
from facegen.models.embedder import (
    PREPROCESSING_KEYS,
    Preprocessing,
    graph_preprocessing,
    leading_affine_ops,
    parse_preprocessing,
    preprocessing_diff,
)
from facegen.models.errors import UserError


def test_cli_copy_of_the_keys_is_the_same():
    assert CLI_KEYS == PREPROCESSING_KEYS


def test_parse_values_lists_and_refusals():
    assert parse_preprocessing(["input_size=96", "mean=0", "std=0.5,0.25,0.125", "channel_order=bgr",
                                "resize_mode=area"]) == {
        "input_size": 96, "mean": [0.0, 0.0, 0.0], "std": [0.5, 0.25, 0.125], "channel_order": "BGR",
        "resize_mode": "area"}
    for bad, message in [("size=3", "KEY one of input_size"), ("mean=1,2", "one value or three"),
                         ("std=0", "must be positive"), ("channel_order=RBG", "not in"), ("input_size=x", "invalid"),
                         ("mean", "KEY=VALUE")]:
        with pytest.raises(UserError, match=message):
            parse_preprocessing([bad])


def test_diff_names_fields():
    a = Preprocessing()
    assert preprocessing_diff(a, Preprocessing(mean=(0, 0, 0), channel_order="BGR")) == ["mean", "channel_order"]
    assert preprocessing_diff(a, Preprocessing()) == []


def _graph(first_ops, input_hw=(112, 112)):
    """A tiny ONNX model: the input goes through `first_ops` (each with a constant), then a Conv."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits, tensor = [], [], "data"
    for i, op in enumerate(first_ops):
        inits.append(numpy_helper.from_array(np.array([127.5 if op in ("Sub", "Add") else 0.0078125], np.float32),
                                             f"c{i}"))
        nodes.append(helper.make_node(op, [tensor, f"c{i}"], [f"t{i}"]))
        tensor = f"t{i}"
    inits.append(numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w"))
    nodes.append(helper.make_node("Conv", [tensor, "w"], ["out"]))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("data", TensorProto.FLOAT,
                                                                         [1, 3, *input_hw])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)], inits)
    return onnx.helper.make_model(graph)


def test_in_graph_normalisation_means_raw_pixels():
    fields, note = graph_preprocessing(_graph(["Sub", "Mul"]))
    assert leading_affine_ops(_graph(["Sub", "Mul"])) == ["Sub", "Mul"]
    assert fields == {"input_size": 112, "mean": [0.0, 0.0, 0.0], "std": [1 / 255] * 3}
    assert "raw 0..255 RGB" in note
    fields, note = graph_preprocessing(_graph(["Sub", "Div"], (96, 96)))
    assert fields["std"] == [1 / 255] * 3 and fields["input_size"] == 96
    # A scale alone, or nothing, is not a normalisation: insightface's (x/255 - 0.5)/0.5.
    for ops in (["Mul"], []):
        fields, note = graph_preprocessing(_graph(ops))
        assert fields == {"input_size": 112} and "(x/255 - 0.5)/0.5" in note


def test_sface_graph_is_detected(tmp_path):
    from facegen.models.loading import load_embedder
    from tests.faces.photos import sface_path

    embedder = load_embedder(sface_path())
    assert embedder.preprocessing == Preprocessing(input_size=112, mean=(0, 0, 0), std=(1 / 255,) * 3)
    assert any("Sub/Mul first" in note for note in embedder.notes)
    explicit = load_embedder(sface_path(), channel_order="BGR", mean=[0.5] * 3)
    assert explicit.preprocessing.channel_order == "BGR" and explicit.preprocessing.mean == (0.5,) * 3
    assert explicit.preprocessing.std == (1 / 255,) * 3  # the detected field the flags did not name
    assert explicit.weights_fingerprint == embedder.weights_fingerprint != explicit.fingerprint
    with pytest.raises(UserError, match="model input is 112x112 but preprocessing.input_size is 96"):
        load_embedder(sface_path(), input_size=96)
