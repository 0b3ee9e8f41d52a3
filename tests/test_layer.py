"""The fast MOELORA layer against plain per-expert reference implementations, in float64, forward and backward."""

import pytest
import torch
from peft import get_peft_model
from torch import nn

from moe_peft_plugin import MoeLoraConfig
from moe_peft_plugin import losses as L
from moe_peft_plugin.routing import route, router_logits

from .reference import reference_contrastive, reference_layer, reference_load_balancing, reference_training_layer


class Tiny(nn.Module):
    def __init__(self, d_in=16, d_out=12):
        super().__init__()
        self.lin = nn.Linear(d_in, d_out, bias=False)

    def forward(self, x):
        return self.lin(x)


# name, config kwargs, expert mask (or None)
LAYER_CASES = [
    ("topk-4-2", {"num_experts": 4, "top_k": 2}, None),
    ("topk-8-2-temp", {"num_experts": 8, "top_k": 2, "router_temperature": 0.7}, None),
    ("topk-4-1", {"num_experts": 4, "top_k": 1}, None),
    ("topk-4-4", {"num_experts": 4, "top_k": 4}, None),
    ("soft-3", {"num_experts": 3, "router_type": "soft"}, None),
    ("soft-3-learned-temp", {"num_experts": 3, "router_type": "soft", "learn_router_temperature": True}, None),
    ("single-expert", {"num_experts": 1, "top_k": 1}, None),
    ("rslora-r4", {"num_experts": 4, "top_k": 2, "r": 4, "lora_alpha": 16, "use_rslora": True}, None),
    ("masked-soft", {"num_experts": 4, "router_type": "soft"}, [True, False, True, True]),
    ("masked-topk", {"num_experts": 4, "top_k": 2}, [False, True, True, True]),
]


def _make(kwargs, seed=0):
    torch.manual_seed(seed)
    model = Tiny().double()
    config = MoeLoraConfig(target_modules=["lin"], init_weights=False, aux_loss_coef=0.0, **kwargs)
    return get_peft_model(model, config)


@pytest.mark.parametrize("batch_shape", [(2, 7), (1, 1), (2, 1)], ids=["14-tokens", "1-token", "2-tokens"])
@pytest.mark.parametrize("name,kwargs,mask", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_inference_path_matches_reference(name, kwargs, mask, batch_shape, monkeypatch):
    """Eval mode, no autograd and no surrounding model forward (cached decoding) takes the short inference path: every
    expert with the unselected ones gated to 0, or, when the tokens select at most half of the experts (a decoding
    step of a small batch), the selected experts alone."""
    import moe_peft_plugin.layer as layer_module

    model = _make(kwargs).eval()
    layer = model.base_model.model.lin
    if mask is not None:
        model.set_expert_mask([i for i, keep in enumerate(mask) if keep])
    num_experts, top_k = layer.num_experts["default"], layer.top_k["default"]
    sparse = kwargs.get("router_type", "topk") == "topk" and top_k < num_experts
    selective = sparse and 2 * batch_shape[0] * batch_shape[1] * top_k <= num_experts
    paths = []
    for function in ("inference_expert_up", "inference_selected_experts"):
        original = getattr(layer_module, function)
        monkeypatch.setattr(
            layer_module, function, lambda *a, _f=original, _name=function: paths.append(_name) or _f(*a)
        )
    with torch.no_grad():
        if "default" in layer.moelora_log_temperature:
            layer.moelora_log_temperature["default"].fill_(-0.3)
        x = torch.randn(*batch_shape, 16, dtype=torch.float64)
        calls = []
        original = layer._inference_update
        layer._inference_update = lambda *a: calls.append(1) or original(*a)
        fast = layer(x)
        assert calls or num_experts == 1, "the inference path was not taken"
        if num_experts > 1:
            assert paths == ["inference_selected_experts" if selective else "inference_expert_up"]
        full = model(x)  # inside the model's routing context: the training-time path
        temperature = kwargs.get("router_temperature", 1.0)
        if "default" in layer.moelora_log_temperature:
            temperature = layer.moelora_log_temperature["default"].exp()
        ref, _, _, _ = reference_layer(
            x.reshape(-1, 16),
            layer.base_layer.weight,
            layer.moelora_A["default"],
            layer.moelora_B["default"],
            layer.moelora_router["default"] if layer.num_experts["default"] > 1 else torch.zeros(1, 16).double(),
            layer.top_k["default"],
            layer.routing_options["default"].router_type,
            layer.scaling["default"],
            temperature,
            None if mask is None else torch.tensor(mask),
        )
    torch.testing.assert_close(fast, ref.reshape_as(fast), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast, full, rtol=1e-10, atol=1e-10)
    # The cached inference weights follow in-place updates (optimizer steps, load_state_dict) and replacements.
    with torch.no_grad():
        layer.moelora_B["default"].mul_(2.0)
        if "default" in layer.moelora_router:
            layer.moelora_router["default"].add_(0.5 * torch.randn_like(layer.moelora_router["default"]))
        updated = layer(x)
        assert not torch.allclose(updated, fast)
        torch.testing.assert_close(updated, model(x), rtol=1e-10, atol=1e-10)
        layer.moelora_A["default"] = torch.nn.Parameter(2 * layer.moelora_A["default"])
        torch.testing.assert_close(layer(x), model(x), rtol=1e-10, atol=1e-10)
        # ... and changes of the expert mask and of a learned temperature.
        if layer.num_experts["default"] > 1:
            model.set_expert_mask([0, 1] if mask is None else None)
            torch.testing.assert_close(layer(x), model(x), rtol=1e-10, atol=1e-10)
        if "default" in layer.moelora_log_temperature:
            layer.moelora_log_temperature["default"].fill_(0.4)
            torch.testing.assert_close(layer(x), model(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,kwargs,mask", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_forward_backward_match_reference(name, kwargs, mask):
    model = _make(kwargs)
    layer = model.base_model.model.lin
    if mask is not None:
        model.set_expert_mask([i for i, keep in enumerate(mask) if keep])
    torch.manual_seed(1)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    out = model(x)
    cotangent = torch.randn_like(out)
    (out * cotangent).sum().backward()

    params = {
        "A": layer.moelora_A["default"].detach().clone().requires_grad_(),
        "B": layer.moelora_B["default"].detach().clone().requires_grad_(),
    }
    num_experts = params["A"].shape[0]
    has_router = num_experts > 1
    if has_router:
        params["router"] = layer.moelora_router["default"].detach().clone().requires_grad_()
    temperature = kwargs.get("router_temperature", 1.0)
    if "default" in layer.moelora_log_temperature:
        params["log_t"] = layer.moelora_log_temperature["default"].detach().clone().requires_grad_()
        temperature = params["log_t"].exp()
    x_ref = x.detach().clone().requires_grad_()
    tokens = x_ref.reshape(-1, 16)
    router = params.get("router", torch.zeros(1, 16, dtype=torch.float64))
    expert_mask = None if mask is None else torch.tensor(mask)
    ref, gates, _, _ = reference_layer(
        tokens,
        layer.base_layer.weight.detach(),
        params["A"],
        params["B"],
        router,
        layer.top_k["default"],
        layer.routing_options["default"].router_type,
        layer.scaling["default"],
        temperature,
        expert_mask,
    )
    ref = ref.reshape_as(out)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    (ref * cotangent).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.moelora_A["default"].grad, params["A"].grad, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(layer.moelora_B["default"].grad, params["B"].grad, rtol=1e-9, atol=1e-10)
    if has_router:
        torch.testing.assert_close(layer.moelora_router["default"].grad, params["router"].grad, rtol=1e-9, atol=1e-10)
        assert layer.moelora_router["default"].grad.abs().sum() > 0, "the router must get a gradient from the output"
    if "log_t" in params:
        torch.testing.assert_close(layer.moelora_log_temperature["default"].grad, params["log_t"].grad)
    if expert_mask is not None:
        assert torch.all(gates[:, ~expert_mask] == 0)
        torch.testing.assert_close(gates.sum(-1), torch.ones(gates.shape[0], dtype=gates.dtype))


class TinyWithMask(Tiny):
    def forward(self, x, attention_mask=None):
        return self.lin(x)


class FixedDropout(nn.Module):
    """A dropout with a fixed mask, so that the reference can apply the same one."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def forward(self, x):
        return x * self.mask


LOSSES = {
    "load_balancing": "aux_loss_coef",
    "router_z": "router_z_loss_coef",
    "gate_balance": "gate_balance_loss_coef",
    "contrastive": "contrastive_loss_coef",
}
AUX = {"aux_loss_coef": 0.3, "router_z_loss_coef": 0.05}
# name, config kwargs, expert mask (or None)
TRAINING_CASES = [
    ("topk-8-2", {"num_experts": 8, "top_k": 2, **AUX}, None),
    ("topk-4-1", {"num_experts": 4, "top_k": 1, **AUX}, None),
    ("topk-4-4", {"num_experts": 4, "top_k": 4, **AUX}, None),
    (
        "topk-8-2-temp-contrastive",
        {"num_experts": 8, "top_k": 2, "router_temperature": 0.7, "contrastive_loss_coef": 0.2},
        None,
    ),
    (
        "topk-4-2-contrastive-only",
        {"num_experts": 4, "top_k": 2, "aux_loss_coef": 0.0, "contrastive_loss_coef": 0.2},
        None,
    ),
    ("topk-4-2-no-losses", {"num_experts": 4, "top_k": 2, "aux_loss_coef": 0.0}, None),
    (
        "soft-3-learned-temp",
        {
            "num_experts": 3,
            "router_type": "soft",
            "learn_router_temperature": True,
            "aux_loss_coef": 0.2,
            "gate_balance_loss_coef": 0.1,
        },
        None,
    ),
    (
        "soft-3-frozen-experts",
        {"num_experts": 3, "router_type": "soft", "freeze_experts": True, "gate_balance_loss_coef": 0.1},
        None,
    ),
    ("masked-topk", {"num_experts": 4, "top_k": 2, **AUX}, [False, True, True, True]),
    ("masked-soft", {"num_experts": 4, "router_type": "soft", **AUX}, [True, False, True, True]),
    ("single-expert", {"num_experts": 1, "top_k": 1, **AUX}, None),
    ("dropout", {"num_experts": 4, "top_k": 2, "lora_dropout": 0.3, **AUX, "contrastive_loss_coef": 0.2}, None),
    ("jitter", {"num_experts": 4, "top_k": 2, "router_jitter_noise": 0.2, **AUX}, None),
    (
        "jitter-noise-top-1",
        {"num_experts": 4, "top_k": 1, "router_jitter_noise": 0.2, "router_noise_std": 1.0, **AUX},
        None,
    ),
    ("noise-top-2", {"num_experts": 8, "top_k": 2, "router_noise_std": 1.0, **AUX}, None),
]


@pytest.mark.parametrize("name,kwargs,mask", TRAINING_CASES, ids=[c[0] for c in TRAINING_CASES])
def test_training_forward_losses_statistics_and_gradients_match_reference(name, kwargs, mask, monkeypatch):
    """The training path with router losses, padding and statistics, against `reference_training_layer`.

    Dropout is a fixed mask on the expert input; the jitter of the router input and the selection noise are drawn from
    the same seed as the layer draws them (jitter first, then noise). The expert load (the `f_e` of the load-balancing
    loss) is counted in float32 by design, so what depends on it is compared to float32 precision. The router shares
    the matmul of the expert down-projection unless dropout or jitter give them different inputs."""
    import moe_peft_plugin.layer as layer_module

    fused_calls = []
    original = layer_module.expert_down_with_router
    monkeypatch.setattr(layer_module, "expert_down_with_router", lambda *a: fused_calls.append(1) or original(*a))
    torch.manual_seed(0)
    config = MoeLoraConfig(target_modules=["lin"], init_weights=False, **kwargs)
    model = get_peft_model(TinyWithMask().double(), config)
    model.base_model.record_sample_routing(True)
    layer = model.base_model.model.lin
    num_experts, options = layer.num_experts["default"], layer.routing_options["default"]
    if mask is not None:
        model.set_expert_mask([i for i, keep in enumerate(mask) if keep])
    with torch.no_grad():
        if "default" in layer.moelora_log_temperature:
            layer.moelora_log_temperature["default"].fill_(-0.3)
    dropout_mask = None
    if kwargs.get("lora_dropout"):
        dropout_mask = (torch.rand(14, 16) > 0.3).double() / 0.7
        layer.moelora_dropout["default"] = FixedDropout(dropout_mask)
    torch.manual_seed(1)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    attention_mask = torch.ones(2, 7, dtype=torch.long)
    attention_mask[0, :3] = 0
    cotangent = torch.randn(2, 7, 12, dtype=torch.float64)
    torch.manual_seed(2)
    out = model(x, attention_mask=attention_mask)
    aux_loss = model.base_model.aux_loss
    ((out * cotangent).sum() + aux_loss).backward()

    params = {
        "A": layer.moelora_A["default"].detach().clone().requires_grad_(),
        "B": layer.moelora_B["default"].detach().clone().requires_grad_(),
        "router": (
            layer.moelora_router["default"].detach().clone().requires_grad_()
            if num_experts > 1
            else torch.zeros(1, 16, dtype=torch.float64)
        ),
    }
    temperature = options.router_temperature
    if "default" in layer.moelora_log_temperature:
        params["log_t"] = layer.moelora_log_temperature["default"].detach().clone().requires_grad_()
        temperature = params["log_t"].exp()
    x_ref = x.detach().clone().requires_grad_()
    tokens = x_ref.reshape(-1, 16)
    torch.manual_seed(2)
    jitter = noise = None
    if options.router_jitter_noise:
        jitter = torch.empty_like(tokens).uniform_(
            1.0 - options.router_jitter_noise, 1.0 + options.router_jitter_noise
        )
    if options.router_noise_std:
        noise = options.router_noise_std * torch.randn(14, num_experts, dtype=torch.float64)
    ref, ref_losses, ref_stats = reference_training_layer(
        tokens,
        layer.base_layer.weight.detach(),
        params["A"],
        params["B"],
        params["router"],
        layer.top_k["default"],
        options.router_type,
        layer.scaling["default"],
        temperature,
        None if mask is None else torch.tensor(mask),
        token_weight=attention_mask.reshape(-1),
        dropout_mask=dropout_mask,
        jitter=jitter,
        noise=noise,
        contrastive_temperature=options.contrastive_temperature,
    )
    torch.testing.assert_close(out, ref.reshape_as(out), rtol=1e-10, atol=1e-10)
    fused = num_experts > 1 and dropout_mask is None and jitter is None
    assert bool(fused_calls) == fused

    tol = dict(rtol=1e-6, atol=1e-8) if options.aux_loss_coef else dict(rtol=1e-9, atol=1e-10)
    records = model.base_model.get_routing_stats()
    if num_experts == 1:
        assert not records and aux_loss.item() == 0
        ref_aux = torch.zeros((), dtype=torch.float64)
    else:
        stats = records["lin"]["default"]
        enabled = {loss: getattr(options, coef) for loss, coef in LOSSES.items() if getattr(options, coef)}
        assert set(stats.losses) == set(enabled)
        for loss in enabled:
            torch.testing.assert_close(stats.losses[loss], ref_losses[loss].detach(), **tol, msg=loss)
        ref_aux = sum(
            (coef * ref_losses[loss] for loss, coef in enabled.items()), torch.zeros((), dtype=torch.float64)
        )
        torch.testing.assert_close(aux_loss.double(), ref_aux.detach(), **tol)
        for key, value in ref_stats.items():
            key_tol = dict(rtol=1e-6, atol=1e-8) if key == "expert_load" else dict(rtol=1e-9, atol=1e-10)
            torch.testing.assert_close(getattr(stats, key).double(), value.detach(), **key_tol, msg=key)
        assert stats.sample_load.shape == (2, num_experts)
        torch.testing.assert_close(stats.sample_load.sum(-1), torch.ones(2, dtype=stats.sample_load.dtype))

    ((ref.reshape_as(out) * cotangent).sum() + ref_aux).backward()
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    if kwargs.get("freeze_experts"):
        assert layer.moelora_A["default"].grad is None and layer.moelora_B["default"].grad is None
    else:
        torch.testing.assert_close(layer.moelora_A["default"].grad, params["A"].grad, **tol)
        torch.testing.assert_close(layer.moelora_B["default"].grad, params["B"].grad, **tol)
    if num_experts > 1:
        torch.testing.assert_close(layer.moelora_router["default"].grad, params["router"].grad, **tol)
    if "log_t" in params:
        torch.testing.assert_close(layer.moelora_log_temperature["default"].grad, params["log_t"].grad, **tol)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_router_logits_fp32_and_gradient(dtype):
    torch.manual_seed(0)
    x = torch.randn(5, 8, dtype=dtype, requires_grad=True)
    w = torch.randn(3, 8, dtype=dtype, requires_grad=True)
    logits = router_logits(x, w)
    assert logits.dtype == torch.float32
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = x64 @ w64.T
    torch.testing.assert_close(logits.double(), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(logits)
    (logits * g).sum().backward()
    (ref * g.double()).sum().backward()
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(w.grad.double(), w64.grad, rtol=tol, atol=tol)


@pytest.mark.parametrize("router_type,top_k", [("topk", 2), ("topk", 1), ("soft", 4)])
def test_load_balancing_matches_reference_and_excludes_padding(router_type, top_k):
    torch.manual_seed(0)
    logits = torch.randn(10, 4, dtype=torch.float64, requires_grad=True)
    token_weight = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    routing = route(logits, top_k, router_type)
    share = L.token_shares(token_weight, logits.dtype)
    loss = L.load_balancing_loss(routing.probs, L.expert_load(routing.selected, share), share)
    if router_type == "soft":
        gates_for_count = torch.zeros_like(routing.probs).scatter(-1, routing.probs.argmax(-1, keepdim=True), 1.0)
    else:
        gates_for_count = routing.gates
    ref = reference_load_balancing(routing.probs, gates_for_count, token_weight)
    torch.testing.assert_close(loss, ref)
    # Padding does not count: changing the logits of padded tokens changes nothing.
    logits2 = logits.detach().clone()
    logits2[:3] = torch.randn(3, 4, dtype=torch.float64) * 10
    routing2 = route(logits2, top_k, router_type)
    loss2 = L.load_balancing_loss(routing2.probs, L.expert_load(routing2.selected, share), share)
    torch.testing.assert_close(loss2, loss.detach())
    loss.backward()
    assert logits.grad[3:].abs().sum() > 0 and logits.grad[:3].abs().sum() == 0


def test_load_balancing_is_one_when_uniform_and_grows_with_collapse():
    uniform = torch.zeros(8, 4, dtype=torch.float64)
    uniform_routing = route(uniform + torch.arange(8).remainder(4).view(-1, 1).eq(torch.arange(4)) * 1e-9, 2, "topk")
    uniform_load = L.expert_load(uniform_routing.selected)
    assert abs(L.load_balancing_loss(uniform_routing.probs, uniform_load).item() - 1.0) < 1e-6
    collapsed = torch.tensor([[5.0, 4.0, 0.0, 0.0]], dtype=torch.float64).repeat(8, 1)
    r = route(collapsed, 2, "topk")
    assert L.load_balancing_loss(r.probs, L.expert_load(r.selected)).item() > 1.5


def test_z_loss_and_gate_balance_formulas():
    torch.manual_seed(0)
    logits = torch.randn(6, 3, dtype=torch.float64)
    token_weight = torch.tensor([1, 1, 0, 1, 1, 1])
    keep = token_weight.bool()
    share = L.token_shares(token_weight, logits.dtype)
    torch.testing.assert_close(L.router_z_loss(logits, share), torch.logsumexp(logits[keep], -1).square().mean())
    gates = logits.softmax(-1)
    q = gates[keep].mean(0)
    torch.testing.assert_close(L.gate_balance_loss(gates, share), -torch.log(q.prod()))
    # -log prod q is minimal (E log E) when the mean gates are uniform.
    uniform = torch.full((4, 3), 1 / 3, dtype=torch.float64)
    torch.testing.assert_close(
        L.gate_balance_loss(uniform), torch.tensor(3 * torch.log(torch.tensor(3.0)).item(), dtype=torch.float64)
    )


@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_contrastive_loss_matches_materialised_reference(top_k, with_padding):
    torch.manual_seed(top_k)
    num_experts, r, d_in, d_out, tokens = 4, 3, 10, 9, 12
    x = torch.randn(tokens, d_in, dtype=torch.float64, requires_grad=True)
    A = torch.randn(num_experts, r, d_in, dtype=torch.float64, requires_grad=True)
    B = torch.randn(num_experts, d_out, r, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(tokens, num_experts, dtype=torch.float64)
    logits[:, 3] -= 10.0  # expert 3 gets no token: no prototype, no negative
    routing = route(logits, top_k, "topk")
    selected = routing.selected
    token_weight = (torch.arange(tokens) >= 4).long() if with_padding else None
    h = torch.einsum("ti,eri->ter", x, A)
    fast = L.expert_contrastive_loss(h, B, selected, temperature=0.1, token_weight=token_weight)
    ref = reference_contrastive(x, A, B, selected, temperature=0.1, token_weight=token_weight)
    torch.testing.assert_close(fast.double(), ref, rtol=1e-6, atol=1e-8)
    grads_fast = torch.autograd.grad(fast, (x, A, B))
    grads_ref = torch.autograd.grad(ref, (x, A, B))
    for g_fast, g_ref in zip(grads_fast, grads_ref):
        torch.testing.assert_close(g_fast.double(), g_ref, rtol=1e-5, atol=1e-8)
    assert all(g.abs().sum() > 0 for g in grads_fast)


def test_contrastive_loss_is_finite_for_zero_experts_and_single_expert():
    h = torch.randn(5, 4, 2, requires_grad=True)
    B = torch.zeros(4, 6, 2, requires_grad=True)
    selected = torch.ones(5, 4, dtype=torch.bool)
    loss = L.expert_contrastive_loss(h, B, selected, 0.1)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and torch.isfinite(B.grad).all()
    assert L.expert_contrastive_loss(h[:, :1], B[:1], selected[:, :1], 0.1).item() == 0.0


def test_contrastive_loss_keeps_nothing_per_token_but_its_inputs_for_the_backward_pass():
    # Only the pair weights, (E,) floats per token, may be saved beside h and B (which the layer keeps anyway):
    # autograd over the formula kept ~600 B per token here (normalised outputs, similarities, softmax).
    num_experts, tokens = 8, 512
    h = torch.randn(tokens, num_experts, 8, requires_grad=True)
    B = torch.randn(num_experts, 64, 8, requires_grad=True)
    selected = route(torch.randn(tokens, num_experts), 2, "topk").selected
    inputs = {h.untyped_storage().data_ptr(), B.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in inputs:
            saved.setdefault(storage.data_ptr(), storage.nbytes())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = L.expert_contrastive_loss(h, B, selected, 0.1, torch.ones(tokens, dtype=torch.long))
    assert sum(saved.values()) <= 4 * num_experts * tokens + 1024, sum(saved.values()) / tokens
    loss.backward()
    assert h.grad.abs().sum() > 0 and B.grad.abs().sum() > 0


def test_contrastive_loss_runs_in_float32_for_half_precision_inputs_and_under_autocast():
    torch.manual_seed(0)
    h = torch.randn(24, 4, 3)
    B = torch.randn(4, 10, 3)
    selected = route(torch.randn(24, 4), 2, "topk").selected
    h32, B32 = h.clone().requires_grad_(), B.clone().requires_grad_()
    expected = L.expert_contrastive_loss(h32, B32, selected, 0.1)
    expected.backward()
    h16, B16 = h.bfloat16().float().bfloat16().requires_grad_(), B.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = L.expert_contrastive_loss(h16, B16, selected, 0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and h16.grad.dtype == torch.bfloat16 and B16.grad.dtype == torch.float32
    # Only the bf16 rounding of h differs from the float32 run (a bf16 matmul inside would be far coarser).
    torch.testing.assert_close(loss, expected, rtol=2e-2, atol=0)
    torch.testing.assert_close(B16.grad, B32.grad, rtol=0.1, atol=1e-3 * B32.grad.abs().max().item())
    # Frozen experts (MoLE): no gradient for B, the same gradient for h.
    h_only = h.clone().requires_grad_()
    L.expert_contrastive_loss(h_only, B, selected, 0.1).backward()
    torch.testing.assert_close(h_only.grad, h32.grad)


def test_init_weights_true_is_identity_and_false_is_not():
    x = torch.randn(3, 16, dtype=torch.float64)
    for init, identity in ((True, True), (False, False)):
        torch.manual_seed(0)
        base = Tiny().double()
        expected = base(x)
        model = get_peft_model(base, MoeLoraConfig(target_modules=["lin"], init_weights=init))
        assert torch.allclose(model(x), expected) == identity


def test_expert_mask_validation():
    model = _make({"num_experts": 4, "top_k": 2})
    with pytest.raises(ValueError, match="out of range"):
        model.set_expert_mask([0, 5])
    with pytest.raises(ValueError, match="at least one"):
        model.set_expert_mask([])
    with pytest.raises(ValueError, match="Unknown expert"):
        model.set_expert_mask(["nope"])
    layer = model.base_model.model.lin
    assert layer.expert_mask["default"] is None
    with model.expert_mask([1]):
        assert layer.expert_mask["default"].tolist() == [False, True, False, False]
    assert layer.expert_mask["default"] is None


def _torch_calls(module, x):
    """The torch functions and tensor methods one eval call of `module` issues (cached decoding's cost on a CPU is their
    number, not their size)."""
    from torch.overrides import TorchFunctionMode

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            calls.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    calls = []
    with torch.no_grad(), Record():
        module(x)
    return [name for name in calls if name not in ("__get__", "data_ptr")]  # attribute reads, not operations


VIEWS = ("view", "reshape")  # metadata only: no kernel, no copy


def test_cached_decoding_adds_few_torch_calls_to_lora():
    """Top-2 of 8 experts in decoding. One token (a batch of one): the router's logits, the gates (top-k, softmax),
    the two selected experts gathered and run (two gathers, two batched matmuls, the gating multiplication). Four
    tokens, whose selected experts can be all 8: the fused down-projection (expert inputs and router logits), the
    gates, their spreading over the experts' columns in one small matmul, the up-projection. A guard against
    operations creeping back (the dense path was 8 more than LoRA before the gate spreading replaced a split and
    reshapes)."""
    from peft import LoraConfig

    torch.manual_seed(0)
    lora = get_peft_model(Tiny(64, 64), LoraConfig(target_modules=["lin"], r=8)).eval()
    config = MoeLoraConfig(target_modules=["lin"], num_experts=8, top_k=2, init_weights=False)
    moe = get_peft_model(Tiny(64, 64), config).eval()
    one_token, four_tokens = torch.randn(1, 1, 64), torch.randn(4, 1, 64)
    with torch.no_grad():
        moe.base_model.model.lin(one_token)  # builds the inference weights once
    lora_calls = _torch_calls(lora.base_model.model.lin, one_token)
    assert lora_calls == ["linear", "linear", "linear", "mul", "add", "to"]  # peft 0.21's LoRA
    selected = _torch_calls(moe.base_model.model.lin, one_token)
    assert [name for name in selected if name not in VIEWS] == [
        "linear", "linear", "topk", "softmax", "index_select", "bmm", "mul", "index_select", "bmm", "add", "to"
    ]  # fmt: skip
    assert len(selected) - len(lora_calls) <= 13, selected  # + 8 views
    dense = _torch_calls(moe.base_model.model.lin, four_tokens)
    assert dense == ["linear", "linear", "__getitem__", "topk", "softmax", "new_zeros", "scatter_", "linear", "mul",
                     "matmul", "add", "to"]  # fmt: skip


def test_decoding_one_token_reads_only_its_selected_experts():
    """The selected-experts path never touches the other experts' weights (that is its point: decoding is bound by
    reading weights): NaN in every unselected expert leaves the output of one token exact, while the dense path of a
    larger batch multiplies them by a zero gate and propagates them."""
    model = _make({"num_experts": 8, "top_k": 2}).eval()
    layer = model.base_model.model.lin
    x = torch.randn(1, 1, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = layer(x)
        selected = (x.reshape(1, 16) @ layer.moelora_router["default"].T).topk(2).indices.flatten().tolist()
        unselected = [e for e in range(8) if e not in selected]
        layer.moelora_A["default"][unselected] = float("nan")
        layer.moelora_B["default"][unselected] = float("nan")
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=0)
        assert layer(x.expand(4, 1, 16)).isnan().any()


def test_a_compiled_decoding_step_computes_every_expert():
    """Under torch.compile one token takes the dense path: inductor turns the selected-experts gathers and small
    batched matmuls into loops that measured slower on a CPU (SmolLM2 decoding 0.58x LoRA r=8 against 0.76x dense,
    docs/benchmarks.md). Same output as eager."""
    model = _make({"num_experts": 8, "top_k": 2}).eval()
    layer = model.base_model.model.lin
    x = torch.randn(1, 1, 16, dtype=torch.float64)
    graphs = []

    def capture(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    with torch.no_grad():
        eager = layer(x)  # selected experts
        compiled = torch.compile(layer, backend=capture, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-12, atol=1e-12)
    code = "\n".join(graph.code for graph in graphs)
    assert "topk" in code and "index_select" not in code and "bmm" not in code


@pytest.mark.parametrize("batch_shape", [(3, 5), (1, 1)], ids=["every-expert", "selected-experts"])
def test_inference_path_keeps_the_router_in_float32_under_autocast(monkeypatch, batch_shape):
    import moe_peft_plugin.layer as layer_module

    torch.manual_seed(0)
    model = get_peft_model(Tiny(64, 64), MoeLoraConfig(target_modules=["lin"], num_experts=4, init_weights=False))
    model.eval()
    layer = model.base_model.model.lin
    calls = []
    original = layer_module.router_logits
    monkeypatch.setattr(layer_module, "router_logits", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(*batch_shape, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = layer(x)
        assert calls, "under autocast the router must not run inside the fused (bf16) matmul"
        full = model(x)
    torch.testing.assert_close(fast.float(), full.float(), rtol=2e-2, atol=2e-2)
    calls.clear()
    with torch.no_grad():
        layer(x)
    assert not calls  # without autocast the router rows come from the prepared (fused) weights
