"""ALGORITHM §4's loss (with §5b's returns terms) and its gradients written out element by element in float64, for
tests of the reference and the kernel: the gradients are the closed forms (∂loss_b/∂out =
2/N·(w·coef_out·inv_var·r_F + trs·δ), …), not autograd."""
import torch


def closed_form(d: dict, strength=1.0, trust=0.0, rev=0.0, tscale=1.0):
    """loss (B,) and the gradients of Σ_b loss_b w.r.t. out, flow_next, flow_cur (float64).

    ``d["policy_weight"]`` (B,) and ``d["return_next"]`` (B, *S) are optional (absent or None: the paper's loss).
    With return_next: r_F keeps g' as data, L_T is gone and L_A = (1 − t)·Σ(g' + r' − G)²/N trains the flow.
    """
    B = d["out"].shape[0]
    f = lambda name: d[name].detach().reshape(B, -1).double()  # noqa: E731
    c = lambda name: d[name].detach().double().view(B, 1)  # noqa: E731
    N = f("out").shape[1]
    lam = strength
    t = d["terminal"].double().view(B, 1) if d.get("terminal") is not None else torch.zeros(B, 1, dtype=torch.float64)
    dd = c("coef_out") * (f("out") - lam * f("out_ref"))
    if lam != 1.0:
        dd = dd + (1 - lam) * (c("coef_x") * f("x") - f("x_next"))
    dd = dd * c("inv_var")
    has_fn = d.get("flow_next") is not None
    returns = d.get("return_next") is not None
    w = c("policy_weight") if d.get("policy_weight") is not None else torch.ones(B, 1, dtype=torch.float64)
    r_f = dd - f("reward_grad_next") - (f("flow_next") * (1 - t) if has_fn else 0.0)
    loss = w.view(B) * (r_f**2).sum(1) / N
    g_out = 2 / N * w * c("coef_out") * c("inv_var") * r_f
    if returns:
        r_a = f("flow_next") + f("reward_grad_next") - f("return_next")
        loss = loss + (1 - t.view(B)) * (r_a**2).sum(1) / N
        g_fn = 2 / N * (1 - t) * r_a
    elif has_fn:
        loss = loss + tscale * t.view(B) * (f("flow_next") ** 2).sum(1) / N
        g_fn = 2 / N * (tscale * t * f("flow_next") - (1 - t) * r_f)
    else:
        g_fn = None
    g_fc = None
    if rev != 0.0:
        r_r = f("score_rev") + f("reward_grad_cur")
        if lam != 0.0:
            r_r = r_r - lam * f("score_rev_ref")
        if d.get("flow_cur") is not None:
            r_r = r_r + f("flow_cur")
            g_fc = 2 / N * rev * (1 - t) * r_r
        loss = loss + rev * (1 - t.view(B)) * (r_r**2).sum(1) / N
    if trust != 0.0:
        delta = f("out") - f("out_old")
        loss = loss + trust * (delta**2).sum(1) / N
        g_out = g_out + 2 / N * trust * delta
    shape = d["out"].shape
    return loss, {"out": g_out.view(shape), "flow_next": None if g_fn is None else g_fn.view(shape),
                  "flow_cur": None if g_fc is None else g_fc.view(shape)}
