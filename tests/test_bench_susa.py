"""bench_susa: SUSA's cost against its full-size memory traffic, per shape of the network."""
import dataclasses

import numpy as np
import pytest

import xhrnet_tf
from conftest import tiny_config
from xhrnet_tf.config import Config
from xhrnet_tf.layers import SUSA
from xhrnet_tf.tflite_utils import graph_report, interpreter, to_tflite
from xhrnet_tf.tools import bench_susa


def test_instances_are_the_networks_susa_layers():
    cfg = dataclasses.replace(Config(), model=tiny_config())
    counts = bench_susa.susa_instances(cfg)
    model = xhrnet_tf.build_pose_model(cfg)
    layers = [l for l in model.layers if isinstance(l, SUSA)]
    assert sum(counts.values()) == len(layers)
    assert set(counts) == {(tuple(l.input_shape[1:]), l.direction) for l in layers}
    sizes = [np.prod(shape) for shape, _ in counts]
    assert sizes == sorted(sizes, reverse=True)


def full_size_mul_operands(content, full=(1, 8, 6, 8)):
    """Sorted shapes (padded to rank 4) of the operands that MULs apply to a full tensor."""
    interp = interpreter(content)
    shapes = []
    for op in interp._get_ops_details():  # pylint: disable=protected-access
        dims = [tuple(interp._get_tensor_details(t, 0)["shape"])  # pylint: disable=protected-access
                for t in op["inputs"]]
        if op["op_name"] == "MUL" and full in dims:
            other = dims[1 - dims.index(full)]
            shapes.append((1,) * (4 - len(other)) + tuple(int(d) for d in other))
    return sorted(shapes)


@pytest.mark.parametrize("direction", ["h", "w"])
def test_timed_models_hold_what_they_say(direction):
    shape = (8, 6, 8)
    x = np.random.default_rng(0).normal(size=(1,) + shape).astype(np.float32)
    susa = bench_susa.chain_model("SUSA", shape, direction, steps=2)
    assert [l.direction for l in susa.layers if isinstance(l, SUSA)] == [direction] * 2
    interp = interpreter(to_tflite(susa))
    interp.set_tensor(interp.get_input_details()[0]["index"], x)
    interp.invoke()
    out = interp.get_tensor(interp.get_output_details()[0]["index"])
    np.testing.assert_allclose(out, susa(x).numpy(), rtol=1e-4, atol=1e-5)
    skeleton = to_tflite(bench_susa.chain_model("skeleton", shape, direction, 2))
    # per step: query weighting, attention-weighted sum, gate, and the one scaling of num
    assert graph_report(skeleton)["ops"] == {"MUL": 8, "SUM": 4}
    # its full-size MULs broadcast the operand shapes SUSA's own do
    assert full_size_mul_operands(skeleton) == full_size_mul_operands(to_tflite(susa))
    gate = bench_susa.chain_model("gate MUL", shape, direction, 1)
    good = bench_susa.chain_model("good MUL", shape, direction, 1)
    assert graph_report(to_tflite(gate))["ops"] == {"MUL": 1}
    # the tensors besides input and output: the broadcast operand
    weights = {k: [t["shape"].tolist() for t in interpreter(to_tflite(m)).get_tensor_details()
                   if t["shape"].tolist() != [1, 8, 6, 8]]
               for k, m in (("gate", gate), ("good", good))}
    assert weights["good"] == [[1, 1, 6, 8]]
    assert weights["gate"] == ([[1, 8, 1, 8]] if direction == "h" else [[1, 1, 6, 8]])


def test_measure_times_each_kind_and_totals_by_instances(monkeypatch, capsys):
    monkeypatch.setattr(bench_susa, "susa_instances", lambda config: {((8, 6, 8), "w"): 3})
    rows = bench_susa.measure(None, runs=3, steps=2)
    assert len(rows) == 1 and all(rows[0][k] > 0 for k in bench_susa.KINDS)
    totals = bench_susa.totals(rows)
    assert totals == {k: pytest.approx(3 * rows[0][k] / 1e3) for k in bench_susa.KINDS}
    bench_susa.print_report(rows)
    assert "| 8x6x8 | w | 3 |" in capsys.readouterr().out


def test_bad_config_is_one_line(capsys):
    assert bench_susa.main(["--config", "no_such_config"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --config") and "no_such_config" in err
    assert bench_susa.main(["--config", "wnl18"]) == 1
    assert "no SUSA layer" in capsys.readouterr().err
