"""utils/dream.py: open-loop dreams, error against the horizon, TensorBoard logging, the CLI, interactive play."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import tiny_args

import drama_xs
from utils import dream as dr
from utils import play
from utils.checkpoint import save_agent

REPO = Path(__file__).resolve().parent.parent
PONG_MEANINGS = ["NOOP", "FIRE", "RIGHT", "LEFT", "RIGHTFIRE", "LEFTFIRE"]


def one_layer_args() -> drama_xs.Args:
    return tiny_args(drama_xs, n_layers=1)


@pytest.fixture(scope="module")
def tiny_agent():
    torch.manual_seed(0)
    return drama_xs.Agent(one_layer_args(), 6)


def trajectory(length: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    obs = rng.integers(0, 256, (length, 64, 64, 3), dtype=np.uint8)
    return obs, rng.integers(0, 6, length), rng.normal(size=length).astype(np.float32)


def test_dream_shapes_and_context(tiny_agent):
    obs, actions, rewards = trajectory(12)
    tiny_agent.world_model.train()
    result = dr.dream(tiny_agent.world_model, obs, actions, rewards, context_length=4)
    assert tiny_agent.world_model.training  # eval() inside, the caller's mode restored
    for key in ("real", "reconstructed", "imagined"):
        assert result[key].shape == (12, 64, 64, 3) and result[key].dtype == np.uint8
    for key in ("rewards", "predicted_rewards", "imagination_mse", "reconstruction_mse", "reward_error"):
        assert result[key].shape == (12,) and np.isfinite(result[key]).all()
    assert np.array_equal(result["real"], obs)
    assert np.array_equal(result["imagined"][:4], result["reconstructed"][:4])  # context: reconstructions
    assert np.allclose(result["imagination_mse"][:4], result["reconstruction_mse"][:4])
    again = dr.dream(tiny_agent.world_model, obs, actions, rewards, context_length=4)
    assert np.array_equal(again["imagined"], result["imagined"])  # modes: the same dream every call
    assert dr.strip(result).shape == (12, 64, 192, 3)
    assert dr.strip(result, separator=2).shape == (12, 64, 196, 3)
    assert np.array_equal(dr.strip(result)[:, :, 128:], result["imagined"])


# ----------------------------------------------------------------------------------------------------------
# A stub world model whose predictions are known: latent = one categorical over 256 "pixel values".
# posterior(obs) is the frame's pixel value; h counts the (z, a) inputs the dynamics has seen; the prior after
# n inputs is value n; the decoder paints the whole frame with its value; the reward of h is 0.5 * n.
# ----------------------------------------------------------------------------------------------------------
class StubDynamics(nn.Module):
    def forward(self, z, action, state=None):
        count = torch.arange(1, z.shape[1] + 1, dtype=torch.float32).expand(z.shape[0], -1)  # (B, L)
        return count[..., None], count[:, -1]  # h (B, L, 1), state: inputs seen

    def forward_token(self, z, action, state):
        return (state + 1)[:, None], state + 1


class StubWorldModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.dynamics = StubDynamics()

    def posterior(self, obs):
        return nn.functional.one_hot(obs[..., 0, 0, 0].long(), 256).float()[..., None, :]  # (..., 1, 256)

    def prior(self, h):
        return nn.functional.one_hot(h[..., 0].long() % 256, 256).float()[..., None, :]

    def decoder(self, z):
        value = z.argmax(-1).float() / 255  # (N,)
        return value[:, None, None, None].expand(-1, 3, 64, 64)

    def reward(self, h):
        return 0.5 * h[..., 0]


def stub_episode(values, rewards):
    obs = np.broadcast_to(np.asarray(values, np.uint8)[:, None, None, None], (len(values), 64, 64, 3)).copy()
    return {"obs": obs, "actions": np.zeros(len(values), np.int64), "rewards": np.asarray(rewards, np.float32)}


def test_dream_alignment_on_stub():
    episode = stub_episode([10, 20, 30, 40, 50, 60], [1, 2, 3, 4, 5, 6])
    result = dr.dream(StubWorldModel(), episode["obs"], episode["actions"], episode["rewards"], context_length=2)
    # imagined frame t >= C comes from the prior after t inputs (C real + t - C imagined): value t
    assert [int(f[0, 0, 0]) for f in result["imagined"]] == [10, 20, 2, 3, 4, 5]
    assert np.array_equal(result["reconstructed"], episode["obs"])
    assert np.allclose(result["predicted_rewards"], 0.5 * np.arange(1, 7))  # reward(h_t), h_t saw t + 1 inputs
    assert np.allclose(result["imagination_mse"][2:], ((np.arange(2, 6) - [30, 40, 50, 60]) / 255) ** 2)
    assert np.allclose(result["reconstruction_mse"], 0)


def test_error_vs_horizon_exact_on_stub():
    rng = np.random.default_rng(1)
    episodes = [stub_episode(rng.integers(0, 256, n), rng.normal(size=n)) for n in (9, 13)]
    C, H = 3, 4
    errors = dr.error_vs_horizon(StubWorldModel(), episodes, context_length=C, horizon=H, max_starts=100)
    mse, reward_error, starts = np.zeros(H), np.zeros(H), 0
    for episode in episodes:
        values, rewards = episode["obs"][:, 0, 0, 0].astype(float), episode["rewards"].astype(float)
        for s in range(len(values) - C - H + 1):
            starts += 1
            for k in range(1, H + 1):
                t = s + C - 1 + k  # frame of horizon k, predicted after C + k - 1 inputs
                mse[k - 1] += ((C + k - 1) / 255 - values[t] / 255) ** 2
                reward_error[k - 1] += abs(0.5 * (C + k) - rewards[t])  # reward of a_t from h_t: C + k inputs
    assert errors["starts"] == starts == (9 - 7 + 1) + (13 - 7 + 1)
    assert errors["horizon"] == [1, 2, 3, 4]
    np.testing.assert_allclose(errors["pixel_mse"], mse / starts, rtol=1e-6)
    np.testing.assert_allclose(errors["reward_abs_error"], reward_error / starts, rtol=1e-6)
    assert errors["reconstruction_mse"] == 0
    # batches of 2 starts, and a cap of 3 evenly spread starts, give the same kind of numbers
    batched = dr.error_vs_horizon(StubWorldModel(), episodes, C, H, max_starts=100, batch_size=2)
    np.testing.assert_allclose(batched["pixel_mse"], errors["pixel_mse"], rtol=1e-6)
    assert dr.error_vs_horizon(StubWorldModel(), episodes, C, H, max_starts=3)["starts"] == 3
    with pytest.raises(dr.UserError, match="lower --horizon"):
        dr.error_vs_horizon(StubWorldModel(), episodes, C, horizon=20)


def test_key_action():
    assert play.key_action([], PONG_MEANINGS) == 0
    assert play.key_action(["right"], PONG_MEANINGS) == 2
    assert play.key_action(["right", "space"], PONG_MEANINGS) == 4
    assert play.key_action(["space"], PONG_MEANINGS) == 1
    assert play.key_action(["up"], PONG_MEANINGS) == 0  # Pong has no UP: NOOP
    assert play.key_action(["up", "left", "space"], PONG_MEANINGS) == 5  # UPLEFTFIRE -> LEFTFIRE
    assert play.key_action(["3"], PONG_MEANINGS) == 3
    assert play.key_action(["9"], PONG_MEANINGS) == 0  # no action 9: NOOP
    full = ["NOOP", "FIRE", "UP", "RIGHT", "LEFT", "DOWN", "UPRIGHT", "UPLEFT", "DOWNRIGHT", "DOWNLEFT", "UPFIRE"]
    assert play.key_action(["up", "space"], full) == full.index("UPFIRE")
    assert play.key_action(["down", "left"], full) == full.index("DOWNLEFT")
    assert play.key_action(["up", "down", "left"], full) == full.index("LEFT")


def test_interactive_headless(tiny_agent, monkeypatch):
    pytest.importorskip("pygame")
    monkeypatch.setenv("SDL_VIDEODRIVER", "dummy")
    obs, actions, _ = trajectory(4)
    keys = [None, "up", {"right", "space"}, "r", "2", None]
    frames = play.play_interactive(tiny_agent.world_model, (obs, actions), PONG_MEANINGS, keys, fps=0)
    assert len(frames) == 1 + 5 + 1  # first frame, 5 steps, 1 restart (then the scripted keys end)
    assert all(f.shape == (64, 64, 3) and f.dtype == np.uint8 for f in frames)
    assert len(play.play_interactive(tiny_agent.world_model, (obs, actions), PONG_MEANINGS, keys, steps=2, fps=0)) == 3
    assert len(play.play_interactive(tiny_agent.world_model, (obs, actions), PONG_MEANINGS, [None, "escape"])) == 2
    calls = []

    def fresh():
        calls.append(1)
        return obs, actions

    assert len(play.play_interactive(tiny_agent.world_model, fresh, PONG_MEANINGS, ["r", "r"], fps=0)) == 3
    assert len(calls) == 3


def test_log_dream_writes_scalars_and_video(tiny_agent, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    buffer = drama_xs.ReplayBuffer(100)
    obs, actions, rewards = trajectory(40)
    for t in range(40):
        buffer.add(obs[t], actions[t], rewards[t], False, t == 0)
    writer = SummaryWriter(str(tmp_path))
    assert dr.log_dream(writer, tiny_agent, buffer, 7, length=64) is None  # fewer than 64 steps stored
    result = dr.log_dream(writer, tiny_agent, buffer, 7, length=24, context_length=4)
    writer.close()
    assert result["real"].shape == (24, 64, 64, 3) and not buffer.n_wm.any()  # DFS counters untouched
    events = EventAccumulator(str(tmp_path), size_guidance={"images": 0})
    events.Reload()
    for tag in ("dream/imagination_mse", "dream/reconstruction_mse", "dream/reward_error"):
        (scalar,) = events.Scalars(tag)
        assert scalar.step == 7 and np.isfinite(scalar.value)
    (video,) = events.Images("dream/real_recon_imagined")
    assert video.encoded_image_string[:6] == b"GIF89a" and (video.width, video.height) == (192, 64)


def run_cli(*argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "utils.dream", *argv], capture_output=True, text=True, env=env, cwd=cwd
    )


def test_cli_writes_video_and_curves(tiny_agent, tmp_path):
    import imageio.v2 as imageio

    save_agent(tiny_agent, one_layer_args(), str(tmp_path / "agent"), "drama_xs")
    out = tmp_path / "out"
    flags = ["--max-steps", "40", "--context-length", "4", "--horizon", "6", "--windows", "2", "--max-starts", "8"]
    proc = run_cli(
        str(tmp_path / "agent"), "--env-id", "ALE/Pong-v5", *flags, "--scale", "2", "--out", str(out), cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    frames = imageio.mimread(out / "dream.mp4", memtest=False)
    assert len(frames) == 2 * (4 + 6) and frames[0].shape == (128, 384, 3)
    assert (out / "error_vs_horizon.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "dream_strip.png").read_bytes()[:4] == b"\x89PNG"
    errors = json.loads((out / "error_vs_horizon.json").read_text())
    assert errors["horizon"] == list(range(1, 7)) and len(errors["pixel_mse"]) == 6 and errors["starts"] == 8


def test_cli_missing_checkpoint(tmp_path):
    proc = run_cli(str(tmp_path / "no-such-run"), cwd=tmp_path)
    assert proc.returncode != 0
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error:")
    assert "Traceback" not in proc.stderr


@pytest.fixture
def numpy_rejects_tensors(monkeypatch):
    """np.asarray of a CUDA tensor raises (TypeError: can't convert cuda:0 device type tensor to numpy): make it
    raise for every tensor, so that a CPU run shows any path that would crash on a GPU."""
    asarray = np.asarray

    def strict(x, *args, **kwargs):
        if isinstance(x, torch.Tensor):
            raise TypeError(f"np.asarray was handed a tensor on {x.device}: it cannot read GPU memory")
        return asarray(x, *args, **kwargs)

    monkeypatch.setattr(np, "asarray", strict)


def test_log_dream_and_dream_never_hand_numpy_a_tensor(tiny_agent, tmp_path, numpy_rejects_tensors):
    from torch.utils.tensorboard import SummaryWriter

    buffer = drama_xs.ReplayBuffer(100)
    obs, actions, rewards = trajectory(30)
    for t in range(30):
        buffer.add(obs[t], actions[t], rewards[t], False, t == 0)
    with SummaryWriter(str(tmp_path)) as writer:
        result = dr.log_dream(writer, tiny_agent, buffer, 3, length=24, context_length=4)
    assert result["real"].shape == (24, 64, 64, 3)
    tensors = [torch.from_numpy(obs[:12]), torch.from_numpy(actions[:12]), torch.from_numpy(rewards[:12])]
    from_tensors = dr.dream(tiny_agent.world_model, *tensors, context_length=4)
    from_numpy = dr.dream(tiny_agent.world_model, obs[:12], actions[:12], rewards[:12], context_length=4)
    assert np.array_equal(from_tensors["imagined"], from_numpy["imagined"])
