"""Both networks run on any odd stamp size, overfit a tiny batch, and the D4 average is invariant;
the ensemble averages its members' logits and round-trips through its weights file."""

from __future__ import annotations

import pytest
import torch

from astrid.ml.models import build_model, count_parameters, d4_views


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test machine's cores are shared: OpenMP threads spinning against each other are slow
    torch.set_num_threads(1)



@pytest.mark.parametrize("name", ["braai", "braai_fast", "astrid"])
@pytest.mark.parametrize("size", [21, 31, 63, 65])
def test_models_take_odd_sizes_and_return_one_logit(name, size):
    torch.manual_seed(0)
    model = build_model(name, size).eval()
    x = torch.randn(5, 3, size, size)
    with torch.no_grad():
        out = model(x)
    assert out.shape == (5,)
    assert torch.isfinite(out).all()


def test_braai_is_the_published_vgg6():
    model = build_model("braai", 63)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32]
    dense = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(d.in_features, d.out_features) for d in dense] == [(6 * 6 * 32, 256), (256, 1)]


def test_braai_fast_keeps_braais_widths_at_a_third_of_its_arithmetic():
    from torch.utils.flop_counter import FlopCounterMode

    fast, braai = build_model("braai_fast", 63).eval(), build_model("braai", 63).eval()
    convs = [m for m in fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [16, 16, 32, 32]
    assert [c.stride for c in convs] == [(2, 2), (1, 1), (1, 1), (1, 1)]
    dense = [m for m in fast.modules() if isinstance(m, torch.nn.Linear)]
    assert [d.out_features for d in dense] == [256, 1]
    flops = []
    for model in (fast, braai):
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(torch.zeros(1, 3, 63, 63))
        flops.append(counter.get_total_flops())
    assert flops[0] < 0.4 * flops[1]


def test_astrid_is_d4_invariant_in_eval_mode():
    torch.manual_seed(1)
    model = build_model("astrid", 31).eval()
    x = torch.randn(4, 3, 31, 31)
    with torch.no_grad():
        ref = model(x)
        for view in d4_views(x):
            torch.testing.assert_close(model(view), ref, atol=1e-5, rtol=1e-5)
        # a single view is not invariant: the average is doing the work
        single = [model.single_view(v) for v in d4_views(x)]
    assert max(float((s - single[0]).abs().max()) for s in single) > 1e-4


def test_even_or_tiny_sizes_and_unknown_names_are_refused():
    with pytest.raises(ValueError):
        build_model("astrid", 30)
    with pytest.raises(ValueError):
        build_model("braai", 15)
    with pytest.raises(ValueError):
        build_model("resnet50", 63)


@pytest.mark.parametrize("name", ["braai", "braai_fast", "astrid"])
def test_a_tiny_batch_can_be_overfitted(name):
    torch.manual_seed(0)
    model = build_model(name, 31)
    # dropout off so that the loss can reach ~0 on 8 examples
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    x = torch.randn(8, 3, 31, 31)
    y = torch.tensor([0, 1, 0, 1, 1, 0, 0, 1], dtype=torch.float32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
    assert loss.item() < 0.02
    assert count_parameters(model) > 1000


def _members():
    return [{"name": "astrid", "kwargs": {"widths": [8, 16, 32]}}, {"name": "braai", "kwargs": {}}]


@pytest.mark.parametrize("size", [21, 33])
def test_ensemble_logit_is_the_mean_of_its_members(size):
    torch.manual_seed(0)
    model = build_model("ensemble", size, members=_members()).eval()
    x = torch.randn(4, 3, size, size)
    with torch.no_grad():
        out = model(x)
        members = torch.stack([m(x) for m in model.members])
    assert out.shape == (4,)
    torch.testing.assert_close(out, members.mean(dim=0))
    # members keep their own behaviour: astrid's D4 average makes its logit invariant
    with torch.no_grad():
        torch.testing.assert_close(model.members[0](x.transpose(2, 3)), members[0], atol=1e-5, rtol=1e-5)
    # the state dict is namespaced by member
    assert {tuple(k.split(".")[:2]) for k in model.state_dict()} == {("members", "0"), ("members", "1")}


def test_ensemble_weights_round_trip_and_load_from_model_dirs(tmp_path):
    from astrid.ml.models import architecture_record, load_ensemble, load_weights, save_weights

    size = 23
    x = torch.randn(3, 3, size, size)
    dirs = []
    for seed, member in enumerate(_members()):
        torch.manual_seed(seed)
        net = build_model(member["name"], size, **member["kwargs"]).eval()
        dirs.append(tmp_path / member["name"])
        save_weights(dirs[-1] / "model.pt", net, architecture_record(member["name"], size, **member["kwargs"]))
        (dirs[-1] / "model.json").write_text(f'{{"stamp_size": {size}, "normalisation": "l2"}}')
    ensemble, arch, prep = load_ensemble(dirs)
    assert arch["name"] == "ensemble" and arch["kwargs"]["members"] == _members()
    assert prep == {"stamp_size": size, "normalisation": "l2", "sky_subtract": False}
    with torch.no_grad():
        expected = (load_weights(dirs[0] / "model.pt")[0](x) + load_weights(dirs[1] / "model.pt")[0](x)) / 2
        torch.testing.assert_close(ensemble(x), expected)
    save_weights(tmp_path / "ens.pt", ensemble, arch)
    again, arch2 = load_weights(tmp_path / "ens.pt")
    assert arch2 == arch and not again.training
    with torch.no_grad():
        assert torch.equal(again(x), ensemble(x))
    # members that normalise differently cannot share one input
    (dirs[1] / "model.json").write_text(f'{{"stamp_size": {size}, "normalisation": "robust"}}')
    with pytest.raises(ValueError, match="preprocess"):
        load_ensemble(dirs)
    with pytest.raises(ValueError):
        build_model("ensemble", size, members=[])
