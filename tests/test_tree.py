"""pair_with_gradients: the one walk the torch and Keras stages use to seed a backward."""
import numpy as np
import pytest

from pipetrain.tree import pair_with_gradients


def _is_array(x):
    return isinstance(x, np.ndarray)


def test_pairs_follow_the_tree_and_skip_leaves_without_a_gradient():
    out = {"h": np.ones((2, 3)), "pos": np.arange(2), "aux": (np.zeros(4), np.ones(1))}
    grads = {"h": np.full((2, 3), 2.0), "pos": None, "aux": (np.full(4, 3.0), None)}
    pairs = pair_with_gradients(out, grads, is_array=_is_array, stage=1)
    assert [(o.shape, g[0] if g.ndim == 1 else g[0, 0]) for o, g in pairs] == [((4,), 3.0), ((2, 3), 2.0)]


def test_mismatches_name_the_stage_and_the_leaf():
    with pytest.raises(ValueError,
                       match=r"stage 2: gradient of output \['h'\] has shape \(2, 4\), the output \(2, 3\)"):
        pair_with_gradients({"h": np.ones((2, 3))}, {"h": np.ones((2, 4))}, is_array=_is_array, stage=2)
    with pytest.raises(ValueError, match=r"stage 3: grad_outputs \['\[0\]', '\[1\]'\] do not match the outputs "
                                         r"\['<value>'\] at <value>"):
        pair_with_gradients(np.ones(2), (np.ones(2), np.ones(2)), is_array=_is_array, stage=3)
