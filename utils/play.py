"""Play inside a DRAMA world model with the keyboard (as DIAMOND offers): each key press is an action, the
world model imagines the next frame, and its predicted reward is shown in the window title.

    python -m utils.dream user/Pong-drama_xs-seed1 --interactive      # (utils.dream records the real context)

Needs pygame (`pip install pygame`); headless: set SDL_VIDEODRIVER=dummy.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from utils import UserError, device_of
from utils.open_loop import as_tensor, eval_mode, latent, to_uint8, window_starts

KEY_HELP = (
    "arrows: UP/DOWN/LEFT/RIGHT, space: FIRE, combined as the game allows (UP+space -> UPFIRE; a combination "
    "the game lacks falls back to its largest available part, then NOOP); digits 0-9: the action of that index; "
    "no key: NOOP; R: a fresh real context; Escape or closing the window: quit"
)


# ----------------------------------------------------------------------------------------------------------
# Interactive: play inside the world model (as DIAMOND offers)
# ----------------------------------------------------------------------------------------------------------
def key_action(keys: Iterable[str], action_meanings: Sequence[str]) -> int:
    """Held keys -> an action index of the game (see KEY_HELP). keys: names "up", "down", "left", "right",
    "space", or a digit "0".."9" (the action of that index, if the game has it)."""
    keys = set(keys)
    for key in sorted(keys):
        if key.isdigit() and int(key) < len(action_meanings):
            return int(key)
    vertical = ({"up", "down"} & keys).pop().upper() if len({"up", "down"} & keys) == 1 else ""  # both: neither
    horizontal = ({"left", "right"} & keys).pop().upper() if len({"left", "right"} & keys) == 1 else ""
    fire = "FIRE" if "space" in keys else ""
    candidates = [
        vertical + horizontal + fire,
        vertical + horizontal,
        vertical + fire,
        horizontal + fire,
        vertical,
        horizontal,
        fire,
    ]
    meanings = list(action_meanings)
    for candidate in candidates:
        if candidate and candidate in meanings:
            return meanings.index(candidate)
    return meanings.index("NOOP") if "NOOP" in meanings else 0


def keyboard() -> Iterable[set[str]]:
    """The keys a person holds, once per frame, from pygame (R and Escape count once per press)."""
    import pygame

    names = {
        pygame.K_UP: "up",
        pygame.K_DOWN: "down",
        pygame.K_LEFT: "left",
        pygame.K_RIGHT: "right",
        pygame.K_SPACE: "space",
        **{getattr(pygame, f"K_{d}"): str(d) for d in range(10)},
    }
    while True:
        keys = set()
        for event in pygame.event.get():
            if event.type == pygame.QUIT or (event.type == pygame.KEYDOWN and event.key == pygame.K_ESCAPE):
                keys.add("escape")
            elif event.type == pygame.KEYDOWN and event.key == pygame.K_r:
                keys.add("r")
        pressed = pygame.key.get_pressed()
        keys |= {name for key, name in names.items() if pressed[key]}
        yield keys


def _key_set(keys) -> set[str]:
    if keys is None:
        return set()
    return {keys.lower()} if isinstance(keys, str) else {key.lower() for key in keys}


@torch.no_grad()
def play_interactive(
    world_model,
    context,
    action_meanings: Sequence[str],
    key_source: Iterable | None = None,
    steps: int | None = None,
    fps: float = 15,
    scale: int = 4,
    sample: bool = False,
) -> list[np.ndarray]:
    """Play inside the world model in a pygame window of (64 * scale)^2 pixels.

    context: (obs (C, 64, 64, 3) uint8, actions (C,)) real steps, or a callable returning one (called again on R).
    key_source: an iterable giving, once per frame, the keys held: a name, a collection of names or None (see
    `key_action`; "r" restarts from a fresh context, "escape" quits); None reads the keyboard. The first frame
    is decoder(z_C), z_C ~ prior(h_{C-1}) after the context; each next frame takes one dynamics.forward_token with the
    chosen action. Stops after `steps` steps (None: when key_source ends or on Escape), at `fps` frames per
    second (0: as fast as possible). Returns the frames shown, (64, 64, 3) uint8 each: 1 + steps + restarts.
    Headless: set SDL_VIDEODRIVER=dummy.
    """
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    try:
        import pygame
    except ImportError:
        raise UserError("--interactive needs pygame: pip install pygame") from None
    get_context = context if callable(context) else lambda: context
    device = device_of(world_model)
    frames: list[np.ndarray] = []

    def restart():
        obs, actions = get_context()
        obs = as_tensor(obs, device)[None]  # (1, C, 64, 64, 3)
        actions = as_tensor(actions, device).long()[None]  # (1, C)
        h, state = world_model.dynamics(latent(world_model.posterior(obs), sample), actions)
        return latent(world_model.prior(h[:, -1]), sample), state  # z_C (1, L)

    def show(z, caption):
        frame = to_uint8(world_model.decoder(z))[0]  # (64, 64, 3)
        frames.append(frame)
        big = frame.repeat(scale, 0).repeat(scale, 1)  # (64 s, 64 s, 3)
        screen.blit(pygame.surfarray.make_surface(big.swapaxes(0, 1)), (0, 0))
        pygame.display.set_caption(caption)
        pygame.display.flip()

    try:
        pygame.display.init()
        screen = pygame.display.set_mode((64 * scale, 64 * scale))
    except pygame.error as error:
        raise UserError(f"cannot open a window for --interactive ({error}): run it on a desktop") from None
    keys_iter = iter(key_source if key_source is not None else keyboard())
    clock, taken, total = pygame.time.Clock(), 0, 0.0
    with eval_mode(world_model), contextlib.ExitStack() as stack:
        stack.callback(pygame.display.quit)
        z, state = restart()
        show(z, "DRAMA dream: real context")
        while steps is None or taken < steps:
            pygame.event.pump()
            keys = _key_set(next(keys_iter, {"escape"}))
            if "escape" in keys:
                break
            if "r" in keys:
                z, state, total = *restart(), 0.0
                show(z, "DRAMA dream: fresh real context")
                continue
            action = key_action(keys, action_meanings)
            h, state = world_model.dynamics.forward_token(z, torch.tensor([action], device=device), state)
            reward = float(world_model.reward(h)[0])
            total += reward
            z = latent(world_model.prior(h), sample)
            taken += 1
            show(z, f"DRAMA dream: {action_meanings[action]}  reward {reward:+.2f}  return {total:+.2f}")
            clock.tick(fps)
    return frames


def play_recorded(world_model, env, episodes: list[dict], context: int, args) -> None:
    """`python -m utils.dream ... --interactive`: play from fresh real contexts of the recorded episodes."""
    meanings = env.unwrapped.get_action_meanings()
    print("actions: " + ", ".join(f"{i} {m}" for i, m in enumerate(meanings)) + f"\nkeys: {KEY_HELP}")
    rng = np.random.default_rng(args.seed)
    contexts = window_starts([len(e["actions"]) for e in episodes], context, 10**9)
    if not contexts:
        raise UserError(f"no recorded episode has --context-length {context} steps: lower it")

    def fresh_context():
        e, s = contexts[rng.integers(len(contexts))]
        return episodes[e]["obs"][s : s + context], episodes[e]["actions"][s : s + context]

    frames = play_interactive(world_model, fresh_context, meanings, None, None, args.fps, args.scale, args.sample)
    print(f"{len(frames)} frames imagined")
