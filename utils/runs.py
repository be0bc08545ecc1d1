"""What every drama_*.py script shares about running, not about the algorithm: the run's options (`RunOptions`,
which each script's `Args` extends with the paper's hyperparameters) and its start (`start_run`)."""

import time
from dataclasses import dataclass
from typing import Literal

import torch

from utils import checkpoint, resolve_device
from utils.atari import check_env_id
from utils.checks import check_compiler
from utils.compile_cache import compile_cache_folders
from utils.precision import autocast, precision_of


@dataclass
class RunOptions:
    """How to run, log, save and evaluate (CleanRL's flags); the scripts' `Args` add the algorithm's settings."""

    seed: int = 1
    """seed of the experiment (python, numpy, torch and the environment)"""
    torch_deterministic: bool = True
    """if toggled, `torch.backends.cudnn.deterministic=True`"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to train: `auto` takes CUDA when available, else the CPU"""
    torch_threads: int = 0
    """CPU threads for torch (0: torch's default, one per physical core)"""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """float format of the forward passes (bf16 autocast; weights, gradients and optimiser state stay fp32).
    `auto`: bf16 on CUDA; on a CPU bf16 where `torch.cpu.get_capabilities()` reports native bf16 (avx512_bf16,
    amx_bf16, Arm bf16: 2-3x faster updates), else fp32 (emulated bf16 is 7-14x slower). See utils/precision.py"""
    compile: bool = False
    """if toggled, `torch.compile` the imagination step (1.3x faster rollout on CPU after a one-time 5-20 s compile;
    needs a C++ compiler on CPU, e.g. `apt-get install g++`)"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "drama"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """whether to capture videos of the agent's training episodes (check out `videos` folder)"""
    save_model: bool = True
    """whether to save the agent (safetensors + args JSON) to the run folder"""
    upload_model: bool = False
    """whether to upload the saved agent to the Hugging Face Hub (needs `--save-model`)"""
    hf_entity: str = ""
    """the user or org name of the Hugging Face Hub model repository (default: your username)"""
    run_dir: str = ""
    """the run folder of a new run: TensorBoard logs, checkpoints, the agent, results (default: runs/<run_name>,
    with a suffix __2, __3, ... when it exists); locked while the run trains"""
    resume: str = ""
    """continue the run saved in this folder, in this folder (wherever it is); its settings are reused, and so is
    its total unless `--total-timesteps` is given; `--device`, `--compile` and `--torch-threads` come from this
    command line"""
    checkpoint_every: int = 10_000
    """write the full training state (for `--resume`) every this many env steps and at the end (0: only when
    stopped by Ctrl-C or SIGTERM); with the 100k-step replay buffer a checkpoint is about 1.3 GB"""
    eval_episodes: int = 100
    """episodes of the final evaluation (the paper's protocol: 100; 0 skips it)"""
    eval_greedy: bool = False
    """evaluate with the actor's most likely action instead of a sampled one"""
    log_every: int = 100
    """log losses to TensorBoard every this many updates"""
    dream_every: int = 5000
    """log a dream to TensorBoard (real | reconstructed | imagined video, imagination errors) every this many
    updates (0: never)"""


def start_run(args, saved, triton_scan: bool = False) -> tuple[str, str, torch.device, torch.autocast]:
    """Check the env id, the device and the compiler (for `--compile`, and on CUDA for a `triton_scan`: the fused
    Mamba-2 scan), then claim the run folder (unique and locked: made after every check), set the compile cache
    folders (`compile_cache_folders`), the CPU threads and the precision (printed, with why).
    `saved`: the training state of a `--resume` run, else None. Returns (run name, run folder, device, autocast)."""
    check_env_id(args.env_id)
    run_name = saved[1]["run_name"] if saved else f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    device = resolve_device(args.device)
    check_compiler(device, args.compile, triton_scan)
    run_dir, run_name = checkpoint.run_folder(args, run_name)
    compile_cache_folders()
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    precision, why = precision_of(args.precision, device)
    print(f"precision {precision} ({why})", flush=True)
    return run_name, run_dir, device, autocast(device, precision)
