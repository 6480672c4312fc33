"""seqfast.replace_modules: in-place swap of torch's RNN / cell / attention modules for seqfast's twins."""
import copy
import logging

import pytest
import torch

import seqfast
from seqfast.patching import replace_modules, twins

try:
    from seqfast.nn.attention import MultiheadAttention as SeqfastMHA
except ImportError:  # attention lands separately
    SeqfastMHA = None


class Net(torch.nn.Module):
    """Every swappable kind, nested in each container, with one cell shared between two places."""

    def __init__(self, shared=None):
        super().__init__()
        shared = shared or torch.nn.GRUCell(6, 6)
        self.encoder = torch.nn.Sequential(torch.nn.Linear(4, 5))
        self.rnns = torch.nn.ModuleList([torch.nn.LSTM(5, 6, batch_first=True), torch.nn.GRU(6, 6, num_layers=2)])
        self.cells = torch.nn.ModuleDict({"lstm": torch.nn.LSTMCell(6, 6), "rnn": torch.nn.RNNCell(6, 6),
                                          "gru": shared})
        self.post = torch.nn.Sequential(torch.nn.RNN(6, 6, nonlinearity="relu"), torch.nn.Identity())
        self.also_gru = shared
        self.head = torch.nn.Linear(6, 3)

    def forward(self, x):  # x [B, T, 4]
        y, _ = self.rnns[0](self.encoder(x))
        y, _ = self.rnns[1](y.transpose(0, 1))
        y, _ = self.post[0](y)
        h = y[-1]
        hc = self.cells["lstm"](h)
        h = self.cells["rnn"](hc[0], hc[1])
        h = self.cells["gru"](h)
        h = self.also_gru(h, h)
        return self.head(h)


def _seqfast_types():
    return tuple(twins().values())


def test_twins_subclass_torch():
    for original, seq in twins().items():
        assert issubclass(seq, original)
        assert original.__module__.startswith("torch.nn.modules")


def test_nested_containers_swapped_in_place_same_parameters():
    model = Net()
    params = {name: p for name, p in model.named_parameters()}
    ids = {name: id(m) for name, m in model.named_modules()}
    assert replace_modules(model) is model
    for name, m in model.named_modules():
        assert id(m) == ids[name]  # the same objects, in place
    for name, p in model.named_parameters():
        assert p is params[name]
    assert type(model.rnns[0]) is seqfast.nn.LSTM and model.rnns[0].batch_first
    assert type(model.rnns[1]) is seqfast.nn.GRU and model.rnns[1].num_layers == 2
    assert type(model.cells["lstm"]) is seqfast.nn.LSTMCell
    assert type(model.cells["rnn"]) is seqfast.nn.RNNCell
    assert type(model.cells["gru"]) is seqfast.nn.GRUCell
    assert type(model.post[0]) is seqfast.nn.RNN and model.post[0].nonlinearity == "relu"
    assert type(model.head) is torch.nn.Linear and type(model.encoder[0]) is torch.nn.Linear
    # isinstance against torch's classes still holds
    assert isinstance(model.rnns[0], torch.nn.LSTM) and isinstance(model.cells["gru"], torch.nn.GRUCell)
    report = model.seqfast_report
    assert sorted(r.name for r in report.replaced) == sorted(
        ["rnns.0", "rnns.1", "cells.lstm", "cells.rnn", "cells.gru", "post.0"])
    assert report.skipped == []
    assert not any("seqfast_report" in k for k in model.state_dict())  # the report is no state


def test_same_outputs_as_torch():
    torch_model = Net()
    model = replace_modules(copy.deepcopy(torch_model))
    x = torch.randn(3, 7, 4)
    torch.testing.assert_close(model(x), torch_model(x), rtol=1e-5, atol=1e-5)


def test_shared_module_swapped_once():
    shared = torch.nn.GRUCell(6, 6)
    model = Net(shared)
    replace_modules(model)
    assert model.cells["gru"] is model.also_gru is shared
    assert type(shared) is seqfast.nn.GRUCell
    names = [r.name for r in model.seqfast_report.replaced]
    assert names.count("cells.gru") + names.count("also_gru") == 1


def test_model_itself_and_idempotent():
    lstm = torch.nn.LSTM(3, 4)
    assert replace_modules(lstm) is lstm and type(lstm) is seqfast.nn.LSTM
    assert [r.name for r in lstm.seqfast_report.replaced] == [""]
    replace_modules(lstm)  # already seqfast: nothing to do
    assert type(lstm) is seqfast.nn.LSTM and lstm.seqfast_report.replaced == []


def test_optimizer_built_before_swap_trains_like_torch():
    torch.manual_seed(0)
    ref = Net()
    model = copy.deepcopy(ref)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (ref, model)]
    replace_modules(model)  # after the optimizer was built
    x, target = torch.randn(4, 6, 4), torch.randn(4, 3)
    for _ in range(3):
        losses = []
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss)
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6, msg=name)


def test_hooks_kept():
    model = Net()
    calls = []
    model.rnns[0].register_forward_pre_hook(lambda m, args: calls.append(("pre", type(m))))
    model.cells["lstm"].register_forward_hook(lambda m, args, out: calls.append(("post", type(m))))
    model.cells["rnn"].weight_hh.register_hook(lambda g: calls.append(("grad", g.shape)))
    model.post[0].register_full_backward_hook(lambda m, gi, go: calls.append(("backward", type(m))))
    replace_modules(model)
    model(torch.randn(2, 5, 4)).sum().backward()
    assert ("pre", seqfast.nn.LSTM) in calls
    assert ("post", seqfast.nn.LSTMCell) in calls
    assert ("grad", (6, 6)) in calls
    assert ("backward", seqfast.nn.RNN) in calls


class OwnForward(torch.nn.LSTM):
    def forward(self, input, hx=None):
        out, state = super().forward(input, hx)
        return out * 2, state


class OwnInit(torch.nn.GRUCell):
    def __init__(self):
        super().__init__(3, 3)
        self.extra = torch.nn.Parameter(torch.zeros(3))


def test_subclasses_left_alone_and_reported(caplog):
    model = torch.nn.ModuleDict({"mine": OwnForward(3, 4), "init": OwnInit(), "plain": torch.nn.LSTM(3, 4)})
    with caplog.at_level(logging.INFO, logger="seqfast"):
        replace_modules(model)
    assert type(model["mine"]) is OwnForward and type(model["init"]) is OwnInit
    assert type(model["plain"]) is seqfast.nn.LSTM
    skipped = {s.name: s for s in model.seqfast_report.skipped}
    assert set(skipped) == {"mine", "init"}
    assert "overrides forward" in skipped["mine"].reason and "OwnForward" in skipped["mine"].cls
    assert "exact" in skipped["init"].reason
    assert "swapped 1 module" in caplog.text and "mine" in caplog.text


def test_subclass_of_seqfast_not_reported():
    class Mine(seqfast.nn.GRU):
        pass
    model = torch.nn.Sequential(Mine(3, 3))
    replace_modules(model)
    assert model.seqfast_report.replaced == [] and model.seqfast_report.skipped == []


@pytest.mark.parametrize("include, expected", [
    (torch.nn.LSTM, {"rnns.0"}),
    ("LSTM", {"rnns.0"}),
    ("torch.nn.GRUCell", {"cells.gru"}),
    (seqfast.nn.RNN, {"post.0"}),
    ([torch.nn.LSTMCell, "RNNCell"], {"cells.lstm", "cells.rnn"}),
    ("cells", {"cells.lstm", "cells.rnn", "cells.gru"}),  # a submodule name: everything under it
    (["cells", "GRUCell"], {"cells.gru"}),  # classes and names combine
])
def test_include_filter(include, expected):
    model = Net()
    replace_modules(model, include=include)
    assert {r.name for r in model.seqfast_report.replaced} == expected
    assert {name for name, m in model.named_modules() if isinstance(m, _seqfast_types())} == expected


def test_include_rejects_unknown_class():
    with pytest.raises(ValueError, match="no twin"):
        replace_modules(Net(), include=torch.nn.Linear)
    with pytest.raises(TypeError):
        replace_modules(Net(), include=[3])
    with pytest.raises(TypeError):
        replace_modules("not a module")


@pytest.mark.skipif(SeqfastMHA is None, reason="seqfast.nn.attention.MultiheadAttention not available")
def test_multihead_attention_swapped():
    torch_mha = torch.nn.MultiheadAttention(8, 2, batch_first=True)
    model = torch.nn.ModuleList([torch_mha])
    ref = copy.deepcopy(torch_mha)
    replace_modules(model)
    assert type(model[0]) is SeqfastMHA and model[0] is torch_mha
    x = torch.randn(2, 5, 8)
    for need_weights in (False, True):
        out, _ = model[0](x, x, x, need_weights=need_weights)
        torch.testing.assert_close(out, ref(x, x, x, need_weights=need_weights)[0], rtol=1e-5, atol=1e-5)
