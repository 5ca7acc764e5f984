"""mm_rec/utils/compile.py: the Inductor options every compile of the project uses."""
import pytest
import torch

from mm_rec.utils import compile as compile_settings


def test_inductor_options_are_the_modes_own_with_combo_kernels(monkeypatch):
    assert compile_settings.inductor_options(None) == {"combo_kernels": True}
    assert compile_settings.inductor_options("reduce-overhead") == {"triton.cudagraphs": True, "combo_kernels": True}
    tuned = compile_settings.inductor_options("max-autotune-no-cudagraphs")
    assert tuned["max_autotune"] is True and tuned["combo_kernels"] is True
    monkeypatch.setattr(compile_settings, "COMBO_KERNELS", False)
    assert compile_settings.inductor_options("reduce-overhead") == {"triton.cudagraphs": True}
    with pytest.raises(RuntimeError, match="mode"):
        compile_settings.inductor_options("fastest")


def test_compile_fn_computes_what_the_function_computes():
    fn = lambda x: torch.sigmoid(x) * x + x.sum(-1, keepdim=True)
    x = torch.randn(3, 5)
    torch.testing.assert_close(compile_settings.compile_fn(fn, fullgraph=True)(x), fn(x))
