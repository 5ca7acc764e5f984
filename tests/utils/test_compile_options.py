"""mm_rec/utils/compile.py: the Inductor options every compile of the project uses, and the layer's
choice of combo kernels by the number of tokens in a call."""
import pytest
import torch

from mm_rec.utils import compile as compile_settings

COMBO = {"combo_kernels": True, "combo_kernel_per_subkernel_blocks": True}


def test_inductor_options_are_the_modes_own_with_combo_kernels():
    assert compile_settings.inductor_options(None) == COMBO
    assert compile_settings.inductor_options("reduce-overhead") == {"triton.cudagraphs": True, **COMBO}
    assert compile_settings.inductor_options("reduce-overhead", combo=False) == {"triton.cudagraphs": True}
    tuned = compile_settings.inductor_options("max-autotune-no-cudagraphs")
    assert tuned["max_autotune"] is True and tuned["combo_kernels"] is True
    with pytest.raises(RuntimeError, match="mode"):
        compile_settings.inductor_options("fastest")


def test_options_this_torch_lacks_are_left_out(monkeypatch):
    """torch.compile rejects an option its Inductor does not know: an older torch without
    per-sub-kernel blocks gets combo kernels alone."""
    import torch._inductor.config as inductor_config
    monkeypatch.delattr(inductor_config, "combo_kernel_per_subkernel_blocks")
    assert compile_settings.inductor_options(None) == {"combo_kernels": True}


def test_compile_by_tokens_picks_the_combo_compile_for_small_calls_only(monkeypatch):
    """Two compiles of one function: calls of at most COMBO_KERNELS_MAX_TOKENS tokens go to the
    one with combo kernels, larger ones to the other; both compute the function."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, options, **kw: (lambda *a: (seen.append(options), fn(*a))[1]))
    monkeypatch.setattr(compile_settings, "COMBO_KERNELS_MAX_TOKENS", 6)
    fn = lambda x: x * 2
    f = compile_settings.compile_by_tokens(fn, lambda x: x.shape[0], mode="reduce-overhead")
    for n in (6, 7, 1):
        x = torch.randn(n, 3)
        torch.testing.assert_close(f(x), fn(x))
    assert [o.get("combo_kernels", False) for o in seen] == [True, False, True]
    assert all(o["triton.cudagraphs"] for o in seen)
    # combo=False (bench_train.py's -nocombo variants): neither compile has them
    seen.clear()
    f = compile_settings.compile_by_tokens(fn, lambda x: x.shape[0], mode="reduce-overhead", combo=False)
    for n in (6, 7):
        f(torch.randn(n, 3))
    assert [o.get("combo_kernels", False) for o in seen] == [False, False]


@pytest.mark.compile
def test_compile_fn_computes_what_the_function_computes():
    fn = lambda x: torch.sigmoid(x) * x + x.sum(-1, keepdim=True)
    x = torch.randn(3, 5)
    torch.testing.assert_close(compile_settings.compile_fn(fn, fullgraph=True)(x), fn(x))


# -- fast by default on CUDA (train_modular) ---------------------------------------------------------
from mm_rec.training.config import parse_args, resolve_speed  # noqa: E402
from mm_rec.utils.errors import UserError  # noqa: E402


def speed(argv=(), device="cuda", world=1, precision="bf16", dropout=0.0, triton=True):
    s = resolve_speed(parse_args(list(argv)), device, world, precision, dropout, has_triton=triton)
    return s.compile, s.cuda_graph, s.note


def test_cuda_compiles_and_captures_by_default_the_cpu_does_not():
    assert speed() == (True, True, None)
    assert speed(device="cpu", precision="fp32") == (False, False, None)
    assert speed(["--compile", "--cuda_graph"], device="cpu")[:2] == (True, True)  # given flags win (refused later)
    assert speed(["--no_compile"]) == (False, True, None)
    assert speed(["--no_cuda_graph"]) == (True, False, None)
    assert speed(["--no_compile", "--no_cuda_graph"]) == (False, False, None)


@pytest.mark.parametrize("case, why", [(dict(world=4), "torchrun"), (dict(precision="fp16"), "fp16"),
                                       (dict(argv=["--gradient_checkpointing"], dropout=0.1), "dropout")])
def test_a_default_that_cannot_apply_falls_back_with_one_note(case, why):
    compile_, graph, note = speed(**case)
    assert compile_ and not graph
    assert why in note and note.startswith("note:") and "\n" not in note
    assert speed(**case, triton=False)[0] is False  # no Triton: no torch.compile either
    if "argv" not in case:
        assert speed(argv=["--cuda_graph"], **case)[1] is True  # asked for: _check_graphable's error says why


def test_on_and_off_together_are_refused():
    with pytest.raises(UserError, match="--compile and --no_compile"):
        parse_args(["--compile", "--no_compile"])
    with pytest.raises(UserError, match="--cuda_graph and --no_cuda_graph"):
        parse_args(["--cuda_graph", "--no_cuda_graph"])
