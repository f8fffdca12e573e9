"""Long context on N devices: one block-sparse attention layer run context parallel, checked against one device.

    torchrun --nproc-per-node=2 examples/context_parallel.py                 # CPU, gloo
    torchrun --nproc-per-node=4 examples/context_parallel.py --device cuda   # GPUs, NCCL (untested here)

Every rank builds the same module and the same global mask (LongGen's sink + window + strided pattern over the
GLOBAL sequence), takes its zigzag shard of the sequence, and runs forward and backward; only the key/value blocks
each rank's queries can see travel. Rank 0 prints the bytes sent against a dense ring and the error against the
single-device module.
"""
import argparse
import os

import torch
import torch.distributed as dist

from blockops.attention import masks
from blockops.distributed import last_call_stats, shard, unshard
from blockops.nn import BlockSparseAttention


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq", type=int, default=4096, help="global sequence length")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)            # one core per rank

    # A mask builder for the GLOBAL length (the module calls it with world * T_local).
    def longgen(q_len, kv_len, dev):
        return masks.sink_window_strided(q_len, sink=64, window=q_len // 16, stride=6, device=dev)

    torch.manual_seed(0)                    # same weights on every rank
    attn = BlockSparseAttention(512, 8, num_kv_heads=2, mask=longgen, device=device,
                                group=dist.group.WORLD, layout="zigzag")
    x = torch.randn(1, args.seq, 512, device=device)          # the global input (same seed on every rank)
    x_local = shard(x, layout="zigzag", seq_dim=1).requires_grad_()
    y_local = attn(x_local)                                     # [1, seq / world, 512]
    y_local.square().mean().backward()
    stats = last_call_stats()

    y = unshard(y_local.detach(), layout="zigzag", seq_dim=1)
    if rank == 0:
        single = BlockSparseAttention(512, 8, num_kv_heads=2, mask=longgen, device=device)
        single.load_state_dict(attn.state_dict())
        with torch.no_grad():
            err = (single(x) - y).abs().max().item()
        print(f"{world} ranks, T={args.seq}: rank 0 sent {stats.bytes_sent / 1e6:.2f} MB of keys/values "
              f"({stats.bytes_sent / stats.dense_ring_bytes_sent:.1%} of a dense ring), "
              f"{stats.tiles_computed} tiles; max |error| vs one device {err:.2e}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
