"""mm_rec/utils/compile.py: the Inductor options every compile of the project uses, and the layer's
choice of combo kernels by the number of tokens in a call."""
import pytest
import torch

from mm_rec.utils import compile as compile_settings

COMBO = {"combo_kernels": True, "combo_kernel_per_subkernel_blocks": True}


def test_inductor_options_are_the_modes_own_with_combo_kernels(monkeypatch):
    assert compile_settings.inductor_options(None) == COMBO
    assert compile_settings.inductor_options("reduce-overhead") == {"triton.cudagraphs": True, **COMBO}
    assert compile_settings.inductor_options("reduce-overhead", combo=False) == {"triton.cudagraphs": True}
    tuned = compile_settings.inductor_options("max-autotune-no-cudagraphs")
    assert tuned["max_autotune"] is True and tuned["combo_kernels"] is True
    monkeypatch.setattr(compile_settings, "COMBO_KERNELS", False)
    assert compile_settings.inductor_options("reduce-overhead") == {"triton.cudagraphs": True}
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


def test_compile_fn_computes_what_the_function_computes():
    fn = lambda x: torch.sigmoid(x) * x + x.sum(-1, keepdim=True)
    x = torch.randn(3, 5)
    torch.testing.assert_close(compile_settings.compile_fn(fn, fullgraph=True)(x), fn(x))
