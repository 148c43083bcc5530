"""A Triton kernel that reads one buffer again and again: with the buffer smaller than the L2
cache and loads that skip L1 (``.cg``), its bytes per second are the L2-to-SM read bandwidth
that an implicit GEMM's operand tiles are fed from (``peak.measure_l2_bandwidth``)."""

import triton
import triton.language as tl


@triton.jit
def l2_read_kernel(x_ptr, out_ptr, n_elements, passes, BLOCK: tl.constexpr):
    """Program p sums elements p*BLOCK.., stepping by the grid, ``passes`` times over; writes
    its BLOCK partial sums to out[p*BLOCK ...] (so no load is dead code)."""
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    lanes = tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for _ in range(passes):
        for start in range(pid * BLOCK, n_elements, step):
            offsets = start + lanes
            acc += tl.load(x_ptr + offsets, mask=offsets < n_elements, other=0.0,
                           cache_modifier=".cg")
    tl.store(out_ptr + pid * BLOCK + lanes, acc)
