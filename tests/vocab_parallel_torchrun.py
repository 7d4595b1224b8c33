"""Run by tests/test_vocab_parallel.py under ``torchrun --nproc_per_node 2`` (env:// initialisation):
a few vocabulary-parallel cases against the unsharded op; prints "vocab-parallel ok" per rank, exits 1
on a mismatch."""
import torch.distributed as dist

from dhkd.distributed import leave_process

from tests.test_vocab_parallel import CASES, check_case


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    splits = [4, 7] if world == 2 else [1] * (world - 1) + [11 - (world - 1)]
    failures = []
    for name, opts, extra in CASES[:3] + CASES[6:7]:
        failures += check_case(name, opts, extra, rank=rank, world=world, splits=splits, group=dist.group.WORLD)
    dist.barrier()
    dist.destroy_process_group()
    if failures:
        print("\n".join(failures))
        return 1
    print(f"rank {rank}: vocab-parallel ok", flush=True)
    return 0


if __name__ == "__main__":
    leave_process(main())  # see its docstring: gloo's C++ teardown can abort a finished worker
