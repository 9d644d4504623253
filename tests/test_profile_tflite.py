"""profile_tflite: perf samples of the interpreter, summed per kind of kernel."""
import shutil

import pytest

from xhrnet_tf.tools import profile_tflite
from xhrnet_tf.tools.profile_tflite import categorize, parse_report, summarize

PERF_TEXT = """\
# Samples: 29K of event 'cpu-clock:ppp'
#
# Overhead  Shared Object                 Symbol
# ........  ............................  .......................
#
    41.27%  libpywrap_litert_common.so    [.] xnn_f32_dwconv_minmax_ukernel_25p16c__avx512f
    12.50%  libpywrap_litert_common.so    [.] xnn_x32_transposec_ukernel__4x4_sse
     3.03%  libpywrap_litert_common.so    [.] tflite::ops::builtin::exp::Eval<(tflite::ops::builtin::exp::KernelType)0>(TfLiteContext*, TfLiteNode*)
     1.10%  libc.so.6                     [.] __memmove_avx512_unaligned_erms
     0.20%  libpython3.11.so.1.0          [.] _PyEval_EvalFrameDefault
"""


def test_categorize_names_the_kind_of_work():
    assert categorize("xnn_qs8_qc8w_dwconv_minmax_fp32_ukernel_25p16c__avx2") == "depthwise conv"
    assert categorize("xnn_f32_gemm_minmax_ukernel_7x16__avx512f_broadcast").startswith("conv")
    assert categorize("xnn_qs8_qc8w_igemm_minmax_fp32_ukernel_4x8c8__avx2").startswith("conv")
    assert categorize("xnn_x8_transposec_ukernel__16x16_reuse_mov_sse2").startswith("transpose")
    assert categorize("xnn_qs8_vadd_minmax_ukernel__avx512skx_mul32_ld128_u16").startswith(
        "elementwise binary")
    assert categorize("xnn_f32_rdsum_ukernel_7p7x__avx512f_c64").startswith("reduce")
    assert categorize("xnn_f32_qs8_vcvt_ukernel__avx512skx_u128").startswith("quantize")
    assert categorize("tflite::ops::builtin::div::Eval<(tflite::ops::builtin::div::KernelType)1>"
                      "(TfLiteContext*, TfLiteNode*)") == "TFLite kernel, not delegated: div"
    assert categorize("gemmlowp::one_over_one_plus_x_for_x_in_0_1<int>") == (
        "TFLite kernel, not delegated: div")
    assert categorize("tflite::ops::builtin::activations::(anonymous namespace)::"
                      "QuantizedReluX<signed char>") == "TFLite kernel, not delegated: relu"
    assert categorize("__memmove_avx512_unaligned_erms", "libc.so.6").startswith("copy")
    assert categorize("_PyEval_EvalFrameDefault", "libpython3.11.so.1.0").startswith("Python")


def test_parse_report_reads_perfs_stdio_table():
    rows = parse_report(PERF_TEXT)
    assert [r[0] for r in rows] == [41.27, 12.5, 3.03, 1.1, 0.2]
    assert rows[2][1] == "libpywrap_litert_common.so"
    assert rows[2][2].startswith("tflite::ops::builtin::exp::Eval<")
    by = dict(summarize(rows))
    assert by["depthwise conv"] == pytest.approx(41.27)
    assert by["TFLite kernel, not delegated: exp"] == pytest.approx(3.03)


def _content(body):
    import tf_keras  # pylint: disable=import-outside-toplevel
    from xhrnet_tf.tflite_utils import to_tflite  # pylint: disable=import-outside-toplevel
    x = inp = tf_keras.Input((96, 96, 64), batch_size=1)
    for i in range(8):
        x = body(x, i)
    return to_tflite(tf_keras.Model(inp, x))


@pytest.mark.skipif(shutil.which("perf") is None, reason="perf (linux-perf) not installed")
def test_profile_finds_the_kernel_a_model_is_made_of():
    """A chain of depthwise convs spends its time in XNNPACK's dwconv kernels; a chain of
    channel shuffles in its transposes: the attribution follows the graph."""
    from tf_keras import layers  # pylint: disable=import-outside-toplevel
    dw = _content(lambda x, i: layers.DepthwiseConv2D(3, padding="same")(x))

    def shuffle(x, i):
        x = layers.Reshape((96 * 96, 2, 32))(x)  # rank 4 with the batch, as in X-HRNet
        x = layers.Permute((1, 3, 2))(x)
        return layers.Reshape((96, 96, 64))(x)

    tr = _content(shuffle)
    for content, expected in ((dw, "depthwise conv"), (tr, "transpose")):
        res = profile_tflite.profile(content, threads=1, seconds=1.5)
        assert res["invokes"] > 0 and res["median_ms"] > 0
        top = summarize(res["rows"])[0][0]
        assert top.startswith(expected), summarize(res["rows"])[:4]


def test_profile_bad_input(tmp_path, capsys):
    assert profile_tflite.main(["--tflite", str(tmp_path / "none.tflite")]) == 1
    err = capsys.readouterr().err
    assert "none.tflite" in err or "perf not found" in err
