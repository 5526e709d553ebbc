"""A float64 reference for one LSTM layer that rounds exactly where the CUDA kernels' contract rounds,
fed step by step with the kernels' own results (so that a one-ulp difference in a 16-bit h cannot
grow into a large one over later steps), for tests/test_emulator.py.

Where the layer rounds (csrc/fastlstm.cpp, csrc/kernels/lstm_kernels.cuh, lstm_forward.cu,
lstm_backward.cu), T being the input dtype and Acc the cell type (float for 16-bit T):
  forward   xg_t (the input projection) is T; h_prev @ w_hh^T is summed in Acc and added to xg in
            Acc; the activations and c_t = f * c + i * g are Acc, c_t is kept and saved in Acc;
            the saved gates are rounded to T; h_t = o * tanh(c_t) is rounded to T (with projection:
            hidden_t is rounded to T, then hidden_t @ w_hr^T is summed in Acc and rounded to T).
  backward  dh = dG_next @ w_hh (or dh_all_t @ w_hr) is summed in Acc; dh and dc are carried in Acc;
            the gate gradients dG_t, the projection's dh_all_t and grad_h0 are rounded to T.
Each Acc operation may err by a few units of Acc's precision u; a sum of K products, in any order,
by (K + 4) u times the sum of the terms' magnitudes. Every check allows that much (a bound E on the
value before rounding) and nothing more: a kernel's value of type T must be what rounding to
nearest (ties to even) gives for some value within E of the reference; a value kept in Acc must be
within E of it. A kernel that keeps c in 16 bits, sums a product in 16 bits or truncates instead of
rounding is off by a sizeable fraction of T's precision and fails."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

F64 = torch.float64


def unit_roundoff(acc_dtype) -> float:
    return 2.0 ** -53 if acc_dtype == F64 else 2.0 ** -24


def round_to(x: torch.Tensor, dtype) -> torch.Tensor:
    """x (float64) rounded to nearest-even in `dtype` as the kernels do it (through Acc = float for
    16-bit types), back in float64."""
    if dtype == F64:
        return x.clone()
    return x.to(torch.float32).to(dtype).to(F64)


def half_ulp(x: torch.Tensor, dtype) -> torch.Tensor:
    fi = torch.finfo(dtype)
    mag = x.abs().clamp_min(fi.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(mag))) * fi.eps / 2


@dataclass
class Stat:
    """One checked quantity: how many elements broke the rule, how many were checked, and the largest
    error as a multiple of what the rule allows (for rounded values, E plus half an ulp of T: 1.0 is
    reached by correct rounding, a truncating kernel gets near 2)."""
    bad: int = 0
    total: int = 0
    worst: float = 0.0
    first: str = ""


@dataclass
class Report:
    dtype: torch.dtype
    stats: dict = field(default_factory=dict)

    def _stat(self, name):
        return self.stats.setdefault(name, Stat())

    def _record(self, name, bad, ratio, where, got, ref, allowed):
        s = self._stat(name)
        s.total += bad.numel()
        n = int(bad.sum())
        if ratio.numel():
            s.worst = max(s.worst, float(ratio.max()))
        if n and not s.bad:
            idx = tuple(int(v) for v in bad.nonzero()[0])
            s.first = (f"{where}{list(idx)}: kernel {got[idx].item():.9g}, reference "
                       f"{ref[idx].item():.9g}, allowed error {allowed[idx].item():.3g}")
        s.bad += n

    def acc(self, name, where, got, ref, err):
        """A value kept in Acc: within err of the reference."""
        d = (got - ref).abs()
        allowed = err
        self._record(name, ~(d <= allowed), d / allowed.clamp_min(1e-300), where, got, ref, allowed)

    def rounded(self, name, where, got, ref, err):
        """A value rounded to the dtype from an Acc value within err of the reference."""
        lo, hi = round_to(ref - err, self.dtype), round_to(ref + err, self.dtype)
        bad = ~((got >= lo) & (got <= hi))
        allowed = err + half_ulp(ref, self.dtype)
        self._record(name, bad, (got - ref).abs() / allowed, where, got, ref, allowed)

    def exact(self, name, where, got, ref):
        bad = ~((got == ref) | (got.isnan() & ref.isnan()))
        zero = torch.zeros_like(ref)
        self._record(name, bad, torch.where(bad, torch.inf, zero), where, got, ref, zero)

    def summary(self) -> str:
        return "; ".join(f"{k}: {s.bad}/{s.total} off, worst {s.worst:.3g}x"
                         for k, s in self.stats.items())

    def failures(self) -> list:
        return [f"{k}: {s.bad} of {s.total} elements off the rounding contract (worst "
                f"{s.worst:.3g}x the allowed error); first {s.first}"
                for k, s in self.stats.items() if s.bad]


def _mm(a, b):
    """a @ b in float64 and the sum of the terms' magnitudes."""
    return a @ b, a.abs() @ b.abs()


def _active(lengths, t, B):
    if lengths is None:
        return torch.ones(B, dtype=torch.bool)
    return t < lengths


def check_forward(rep: Report, a: dict, got: dict, lengths, reverse, acc_dtype):
    """a: the layer's inputs in float64 (h0, c0, w_hh, w_hr or None; values of the dtype, c0 of Acc).
    got: the kernels' training forward in float64 (xg, output, gates, cells, hidden, h_n, c_n_acc)."""
    u = unit_roundoff(acc_dtype)
    xg, out, gates, cells = got["xg"], got["output"], got["gates"], got["cells"]
    T, B, H4 = xg.shape
    H = H4 // 4
    w_hh, w_hr = a["w_hh"], a["w_hr"]
    P = w_hh.shape[1]
    h_prev, c_prev = a["h0"], a["c0"]
    for k in range(T):
        t = T - 1 - k if reverse else k
        act = _active(lengths, t, B)
        on = act[:, None]
        mm, S = _mm(h_prev, w_hh.t())
        pre = mm + xg[t]
        e_pre = (P + 4) * u * (S + xg[t].abs())
        sig = torch.sigmoid(pre)
        q = lambda x, j: x[:, j * H:(j + 1) * H]  # noqa: E731
        i, f, g, o = q(sig, 0), q(sig, 1), torch.tanh(q(pre, 2)), q(sig, 3)
        # sigmoid' <= 1/4, tanh' <= 1, plus the activation's own few units of u.
        ei, ef, eg, eo = (q(e_pre, 0) / 4 + 8 * u, q(e_pre, 1) / 4 + 8 * u, q(e_pre, 2) + 8 * u,
                          q(e_pre, 3) / 4 + 8 * u)
        c = f * c_prev + i * g
        ec = c_prev.abs() * ef + g.abs() * ei + i.abs() * eg + 4 * u * ((f * c_prev).abs()
                                                                        + (i * g).abs())
        tc = torch.tanh(c)
        hh = o * tc
        eh = tc.abs() * eo + o.abs() * (ec + 4 * u * tc.abs()) + 4 * u * hh.abs()
        where = f"t={t} "
        ref_gates = torch.cat([i, f, g, o], 1)
        err_gates = torch.cat([ei, ef, eg, eo], 1)
        act4 = act[:, None].expand(B, 4 * H)
        rep.rounded("gates", where, gates[t][act4], ref_gates[act4], err_gates[act4])
        rep.exact("gates (inactive)", where, gates[t][~act4], torch.zeros_like(gates[t][~act4]))
        actH = on.expand(B, H)
        rep.acc("cells", where, cells[t][actH], c[actH], ec[actH])
        rep.exact("cells (inactive)", where, cells[t][~actH], c_prev[~actH])
        if w_hr is None:
            h_ref, eh_out = hh, eh
        else:
            hid = got["hidden"][t]
            rep.rounded("hidden", where, hid[actH], hh[actH], eh[actH])
            rep.exact("hidden (inactive)", where, hid[~actH], torch.zeros_like(hid[~actH]))
            h_ref, S = _mm(hid, w_hr.t())
            eh_out = (H + 4) * u * S
        actP = on.expand(B, P)
        rep.rounded("output", where, out[t][actP], h_ref[actP], eh_out[actP])
        rep.exact("output (inactive)", where, out[t][~actP], torch.zeros_like(out[t][~actP]))
        h_prev = torch.where(on, out[t], h_prev)
        c_prev = cells[t]
    rep.exact("h_n", "", got["h_n"], h_prev)
    rep.exact("c_n", "", got["c_n_acc"], c_prev)


def check_backward(rep: Report, a: dict, saved: dict, grads: dict, got: dict, lengths, reverse,
                   acc_dtype):
    """a: the layer's inputs (c0, w_hh, w_hr or None); saved: gates, cells of the forward; grads:
    grad_output, grad_h_n, grad_c_n; got: the kernels' dG, dh_all, grad_h0, grad_c0 (all float64)."""
    u = unit_roundoff(acc_dtype)
    gates, cells = saved["gates"], saved["cells"]
    T, B, H4 = gates.shape
    H = H4 // 4
    w_hh, w_hr = a["w_hh"], a["w_hr"]
    P = w_hh.shape[1]
    go = grads["grad_output"]
    dG, dh_all = got["dG"], got["dh_all"]
    time_of = (lambda k: T - 1 - k) if reverse else (lambda k: k)
    dh_state, e_dhs = grads["grad_h_n"].clone(), torch.zeros(B, P, dtype=F64)
    dc_state, e_dcs = grads["grad_c_n"].clone(), torch.zeros(B, H, dtype=F64)
    zero = lambda x: torch.zeros_like(x)  # noqa: E731
    for k in range(T - 1, -2, -1):
        t = time_of(k) if k >= 0 else -1
        next_t = time_of(k + 1) if k + 1 < T else -1
        if next_t >= 0:
            nxt = _active(lengths, next_t, B)[:, None]
            mm, S = _mm(dG[next_t], w_hh)
            dh = torch.where(nxt, mm, dh_state)
            e_dh = torch.where(nxt, (4 * H + 4) * u * S, e_dhs)
        else:
            dh, e_dh = dh_state, e_dhs
        if t < 0:
            rep.rounded("grad_h0", "", got["grad_h0"], dh, e_dh)
            rep.rounded("grad_c0", "", got["grad_c0"], dc_state, e_dcs)
            break
        where = f"t={t} "
        act = _active(lengths, t, B)
        on = act[:, None]
        # Inactive rows carry dh (and dc) and get zero gradients.
        dh_state = torch.where(on, dh_state, dh)
        e_dhs = torch.where(on, e_dhs, e_dh)
        act4 = on.expand(B, 4 * H)
        rep.exact("dG (inactive)", where, dG[t][~act4], zero(dG[t][~act4]))
        dh_tot = dh + go[t]
        e_tot = e_dh + 2 * u * dh_tot.abs()
        if w_hr is not None:
            actP = on.expand(B, P)
            rep.rounded("dh_all", where, dh_all[t][actP], dh_tot[actP], e_tot[actP])
            rep.exact("dh_all (inactive)", where, dh_all[t][~actP], zero(dh_all[t][~actP]))
            dh_tot, S = _mm(dh_all[t], w_hr)
            e_tot = (P + 4) * u * S
        q = lambda x, j: x[:, j * H:(j + 1) * H]  # noqa: E731
        i, f, g, o = (q(gates[t], j) for j in range(4))
        c_prev = a["c0"] if k == 0 else cells[time_of(k - 1)]
        tc = torch.tanh(cells[t])
        e_tc = 4 * u * tc.abs() + 4 * u
        dtc = o * (1 - tc * tc)
        dc = dc_state + dh_tot * dtc
        # 1 - x * x loses up to 2u absolute to rounding x * x, whatever its own size.
        e_dc = (e_dcs + dtc.abs() * e_tot + (dh_tot * o).abs() * (2 * tc.abs() * e_tc + 2 * u)
                + 6 * u * (dc_state.abs() + (dh_tot * dtc).abs()))
        ref = torch.cat([dc * g * i * (1 - i), dc * c_prev * f * (1 - f), dc * i * (1 - g * g),
                         dh_tot * tc * o * (1 - o)], 1)
        err = torch.cat([(g * i * (1 - i)).abs() * e_dc, (c_prev * f * (1 - f)).abs() * e_dc,
                         (i * (1 - g * g)).abs() * e_dc + (dc * i).abs() * 2 * u,
                         (o * (1 - o)).abs() * (tc.abs() * e_tot + dh_tot.abs() * e_tc)], 1)
        err = err + 8 * u * ref.abs()
        rep.rounded("dG", where, dG[t][act4], ref[act4], err[act4])
        dc_state = torch.where(on, dc * f, dc_state)
        e_dcs = torch.where(on, f.abs() * e_dc + 2 * u * (dc * f).abs(), e_dcs)
