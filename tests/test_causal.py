"Package tests of moebook.causal: GridWorld rules, text interface, flow, mapper stage 1, MCTS and errors."
import numpy as np
import pytest
import torch

from moebook.causal import (ACTIONS, ALL_ACTION_TEXTS, CAR_COLUMNS, N_ACTIONS, VARIABLES, Action, CausalRL, Flow, GridWorld,
                            action_index, action_texts, assign_latents, canonical_action_text, causal_graph, check_state,
                            collect_interactions, describe_state, execute_plan, make_planning_problems, make_tokenizer,
                            mcts_plan, parse_action, parse_state, perfect_simulator, r2_matrix, render_state, train_crl,
                            transition)


def random_states(n, seed=0):
    rng, out = np.random.default_rng(seed), []
    while len(out) < n:
        s = np.concatenate([rng.integers(0, 8, 2), rng.integers(0, 2, 3), rng.integers(0, 8, 3)])
        try: out.append(check_state(s))
        except ValueError: pass
    return out


def test_cars_move_iff_green_and_free():
    for s in random_states(500):
        nxt = transition(s, 0)  # no-op: only the mechanism acts
        for i, x in enumerate(CAR_COLUMNS):
            ahead = (s[5 + i] + 1) % 8
            free = (x, ahead) != (s[0], s[1])
            assert nxt[5 + i] == (ahead if s[2 + i] == 1 and free else s[5 + i])
        assert (nxt[:5] == s[:5]).all()


def test_interventions_toggle_move_and_block():
    for s in random_states(300, seed=1):
        for i in range(3):
            assert transition(s, Action("toggle", i))[2 + i] == 1 - s[2 + i]
            for d, dy in (("up", -1), ("down", 1)):
                target = (s[5 + i] + dy) % 8
                blocked = (CAR_COLUMNS[i], target) == (s[0], s[1])
                assert transition(s, Action("car", i, d))[5 + i] == (s[5 + i] if blocked else target)
        for d, (dx, dy) in {"up": (0, -1), "down": (0, 1), "left": (-1, 0), "right": (1, 0)}.items():
            b = transition(s, Action("boulder", -1, d))[:2]
            assert tuple(b) in {(s[0], s[1]), (s[0] + dx, s[1] + dy)}
            nxt = transition(s, Action("boulder", -1, d))
            check_state(nxt)  # the boulder never lands on a car or a light
    # a boulder right in front of a green car stops it; pushing into a car is refused
    assert transition([1, 4, 1, 0, 0, 3, 0, 0], 0)[5] == 3
    assert transition([0, 3, 0, 0, 0, 3, 0, 0], Action("boulder", -1, "right"))[:2].tolist() == [0, 3]


def test_graph_has_the_expected_parents():
    G = causal_graph()
    assert G[:, 5].nonzero()[0].tolist() == [0, 1, 2, 5]  # blue car <- boulder x, y, blue light, itself
    assert G[:, 2].nonzero()[0].tolist() == [2]
    assert G[:, 0].sum() == 8


def test_reset_is_deterministic_and_render_shape():
    a, b = GridWorld(), GridWorld()
    oa, ia = a.reset(seed=5); ob, ib = b.reset(seed=5)
    assert (oa == ob).all() and (ia["state"] == ib["state"]).all()
    for k in range(10):
        ra, rb = a.step(k % N_ACTIONS), b.step(k % N_ACTIONS)
        assert (ra[0] == rb[0]).all() and (ra[4]["state"] == rb[4]["state"]).all()
    assert a.render().shape == (32, 32, 3) and a.render().dtype == np.uint8
    assert render_state(ia["state"], cell_px=6).shape == (48, 48, 3)
    d1, d2 = collect_interactions(3, 6, seed=2), collect_interactions(3, 6, seed=2)
    assert (d1.frames == d2.frames).all() and (d1.text_ids == d2.text_ids).all()


def test_render_reflects_state():
    s = np.array([0, 4, 1, 0, 1, 2, 5, 7])
    img = render_state(s)
    assert not (img == render_state(transition(s, Action("toggle", 0)))).all()
    assert (img[16:20, 0:4] == np.array([130, 85, 40], dtype=np.uint8)).all()  # the boulder's cell


def test_grammar_covers_every_action_and_parses_back():
    assert len(ALL_ACTION_TEXTS) == len(set(ALL_ACTION_TEXTS))
    for k in range(N_ACTIONS):
        assert {parse_action(t) for t in action_texts(k)} == {k}
        assert parse_action(canonical_action_text(k)) == k
    tok = make_tokenizer()
    for t in ALL_ACTION_TEXTS: assert parse_action(tok.decode(tok.encode(t))) == parse_action(t)
    for s in random_states(50): assert (parse_state(describe_state(s)) == s).all()


def test_flow_invertible_with_exact_logdet():
    torch.manual_seed(0)
    flow = Flow(5, n_blocks=3, hidden=16)
    flow(torch.randn(32, 5) * 2)
    for p in flow.parameters(): p.data += 0.2 * torch.randn_like(p)
    flow = flow.double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    z, logdet = flow(x)
    assert torch.allclose(flow.inverse(z), x, atol=1e-9)
    for k in range(4):
        J = torch.autograd.functional.jacobian(lambda v: flow(v[None])[0][0], x[k])
        assert torch.allclose(logdet[k], torch.linalg.slogdet(J)[1], atol=1e-9)


@pytest.mark.slow
@pytest.mark.timeout(900)  # minutes on a busy 2-core machine
def test_crl_training_lowers_the_nll():
    d = collect_interactions(6, 10, seed=0)
    x = torch.randn(6, 11, 4)
    x[:, 1:] = x[:, :-1] * 0.9 + 0.1 * torch.randn(6, 10, 4)  # learnable dynamics
    coords, text = torch.zeros(6, 10, 5), torch.randn(6, 10, 384)
    _, losses = train_crl(x, coords, text, "text", steps=150, seed=0, batch=32)
    assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 0.3
    with pytest.raises(ValueError, match="expected x"): train_crl(x[0], coords, text, "text", 1, 0)


def test_mcts_finds_plans_with_a_perfect_simulator():
    for h, seed in ((1, 0), (2, 1), (3, 2)):
        _, starts, goals = make_planning_problems(4, h, seed)
        for s, g in zip(starts, goals):
            plan = mcts_plan(s, g, h, *perfect_simulator(), n_iters=60)
            assert len(plan) == h and (execute_plan(s, plan) == g).all()


def test_r2_stage_assigns_latents_on_synthetic_data():
    rng = np.random.default_rng(0)
    vals = np.stack([rng.integers(0, 8, 3000), rng.integers(0, 2, 3000), rng.integers(0, 8, 3000)], 1)
    lat = np.stack([rng.normal(size=3000), np.exp(vals[:, 2] / 4) + 0.01 * rng.normal(size=3000),
                    vals[:, 1] + 0.05 * rng.normal(size=3000), -vals[:, 0] ** 2 + 0.1 * rng.normal(size=3000)], 1)
    R = r2_matrix(torch.tensor(lat), vals)
    assert R.argmax(1)[1:].tolist() == [2, 1, 0] and R[1:].max(1).min() > 0.9 and R[0].max() < 0.05
    mask = assign_latents(R)
    assert mask[:, 1:].tolist() == np.eye(3, dtype=bool)[[2, 1, 0]].T.tolist()


def test_bad_inputs_raise_clear_errors():
    env = GridWorld(); env.reset(seed=0)
    with pytest.raises(ValueError, match="action index"): env.step(99)
    with pytest.raises(ValueError, match="invalid action"): env.step(Action("car", 0, "left"))
    with pytest.raises(ValueError, match="outside"): env.reset(options={"state": [8, 0, 0, 0, 0, 1, 1, 1]})
    with pytest.raises(ValueError, match="overlaps"): check_state([1, 3, 0, 0, 0, 3, 0, 0])
    with pytest.raises(ValueError, match="8 entries"): check_state([1, 2])
    with pytest.raises(ValueError, match="cannot parse"): parse_action("teleport the boulder")
    with pytest.raises(ValueError, match="n_episodes"): collect_interactions(0, 5, 0)
    with pytest.raises(ValueError, match="mode"): CausalRL(4, "pixels")
    assert action_index(ACTIONS[3]) == 3 and len(VARIABLES) == 8
