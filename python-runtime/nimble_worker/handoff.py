"""Replicas made equal over the ring: at the start (weights) and when a member joins
(the whole training state)."""

from __future__ import annotations

from .checkpoint import load_state_blob, state_blob
from .comm import Comm, pack_into, staging
from .replica import Replica
from .strategies import Strategy


def sync_params(replica: Replica, comm: Comm, source: int = 0) -> str:
    """Everyone ends with rank `source`'s parameters (one all-reduce of source-or-zeros).
    Returns the parameter hash."""
    buf = staging(comm, sum(p.numel() for p in replica.params))
    if replica.rank == source:
        pack_into(buf, replica.params)
    else:
        buf.zero_()
    replica.load_params(comm.allreduce(buf))
    return replica.hash()


def sync_state(replica: Replica, strategy: Strategy, comm: Comm, source: int) -> str:
    """Every ring member ends with rank `source`'s whole training state: it contributes
    its state blob to one all-gather, the others an empty one. Returns the hash."""
    mine = state_blob(replica, strategy) if replica.rank == source else b""
    blobs = [b for b in comm.allgather(mine) if len(b) > 0]
    if len(blobs) != 1:
        raise RuntimeError(f"sync_state: expected one state blob (from rank {source}), "
                           f"got {len(blobs)}")
    if replica.rank != source:
        load_state_blob(replica, strategy, bytes(blobs[0]))
    return replica.hash()


def mirror_state(replica: Replica, strategy: Strategy, comm: Comm, to: int, tag: str) -> int:
    """A copy of this worker's whole training state to rank `to`'s provider, which keeps it
    (pipeline: a stage's sole holder, at each checkpoint boundary). Returns its bytes."""
    blob = state_blob(replica, strategy)
    comm.send(to, tag, blob)
    return len(blob)


def load_mirror(replica: Replica, strategy: Strategy, comm: Comm, frm: int, tag: str) -> int:
    """Take the state a peer's provider kept (mirror_state's) in place of this worker's
    own: a stage's replacement after its sole holder was lost. Returns its step."""
    load_state_blob(replica, strategy, bytes(comm.recv(frm, tag)))
    return replica.next_step
