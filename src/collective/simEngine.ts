/**
 * Message-level discrete-event simulation of a collective among n members. Pure.
 *
 * A schedule (simSchedules.ts) is a list of messages (chunks) between members and gates:
 * a message leaves when the gate that releases it opens, and once received and processed
 * it signals at most one gate; a gate opens when it has had `count` signals (gate 0 is
 * open at time 0). That is enough for chunk-level pipelining (a ring's chunk is released
 * by the one chunk it sums), for owners that wait on n-1 contributions, and for steps that
 * wait on a whole message.
 *
 * Each member has two FIFO servers: its CPU (one thread, as a Node provider: every send
 * costs sendMessageS + bytes*sendSPerByte, every receive recvMessageS + bytes*recvSPerByte,
 * in the order they become due; the sends a receipt releases go out from the same handler,
 * ahead of receives that arrived meanwhile) and its uplink (bytes*betaSPerByte per message, in the order
 * the CPU hands them over; a sender's concurrent flows share it by the order in which the
 * schedule releases their chunks). A message arrives alphaS after it has left the uplink.
 * Downlinks are not modelled: in these schedules no member receives faster than one uplink
 * sends (senders start their round-robin at different peers).
 */

export interface SimCosts {
  /** one-way latency, s */
  alphaS: number;
  /** uplink seconds per byte */
  betaSPerByte: number;
  /** CPU seconds per message sent / received (framing, syscalls, scheduling) */
  sendMessageS: number;
  recvMessageS: number;
  /** CPU seconds per byte sent (encode, copy, encrypt) / received (decrypt, copy, decode, sum) */
  sendSPerByte: number;
  recvSPerByte: number;
}

export interface SimResult {
  /** when the last message has been received and processed */
  seconds: number;
  messages: number;
  /** the most bytes any one member sent */
  maxBytesSent: number;
}

/** Growable typed arrays of messages and gates. */
export class Schedule {
  readonly members: number;
  messageCount = 0;
  gateCount = 1;
  private src = new Int32Array(1024);
  private dst = new Int32Array(1024);
  private bytes = new Float64Array(1024);
  private releasedBy = new Int32Array(1024);
  private signals = new Int32Array(1024);
  private gateNeed = new Int32Array(1024);
  /** the member that waits on each gate (-1 for gate 0, open at the start for everyone) */
  private gateOwner = Int32Array.from({ length: 1024 }, () => -1);

  constructor(members: number) {
    if (!Number.isInteger(members) || members < 1) throw new RangeError(`members must be a positive integer, got ${members}`);
    this.members = members;
  }

  /** A gate of member `owner` that opens after `count` signals (count >= 1), all receipts of `owner`. */
  gate(count: number, owner: number): number {
    if (!Number.isInteger(count) || count < 1) throw new RangeError(`a gate needs a positive count, got ${count}`);
    if (!Number.isInteger(owner) || owner < 0 || owner >= this.members) throw new RangeError(`no member ${owner}`);
    if (this.gateCount === this.gateNeed.length) {
      this.gateNeed = grow(this.gateNeed);
      this.gateOwner = grow(this.gateOwner);
    }
    this.gateNeed[this.gateCount] = count;
    this.gateOwner[this.gateCount] = owner;
    return this.gateCount++;
  }

  /** A message of `bytes` from src to dst, sent when `releasedBy` opens; signals `signals` (-1: none) once processed. */
  message(src: number, dst: number, bytes: number, releasedBy: number, signals = -1): number {
    if (src === dst || src < 0 || dst < 0 || src >= this.members || dst >= this.members) throw new RangeError(`bad message ${src} -> ${dst}`);
    if (releasedBy < 0 || releasedBy >= this.gateCount || signals >= this.gateCount || signals === 0) throw new RangeError("unknown gate");
    // A member acts only on what it has received: its own gates release its own sends.
    if (releasedBy > 0 && this.gateOwner[releasedBy] !== src) throw new RangeError(`gate ${releasedBy} is not member ${src}'s`);
    if (signals > 0 && this.gateOwner[signals] !== dst) throw new RangeError(`gate ${signals} is not member ${dst}'s`);
    if (this.messageCount === this.src.length) {
      this.src = grow(this.src);
      this.dst = grow(this.dst);
      this.bytes = grow(this.bytes);
      this.releasedBy = grow(this.releasedBy);
      this.signals = grow(this.signals);
    }
    const i = this.messageCount++;
    this.src[i] = src;
    this.dst[i] = dst;
    this.bytes[i] = bytes;
    this.releasedBy[i] = releasedBy;
    this.signals[i] = signals;
    return i;
  }

  /** The raw arrays, trimmed (for the simulator and tests). */
  view() {
    const m = this.messageCount;
    return {
      src: this.src.subarray(0, m),
      dst: this.dst.subarray(0, m),
      bytes: this.bytes.subarray(0, m),
      releasedBy: this.releasedBy.subarray(0, m),
      signals: this.signals.subarray(0, m),
      gateNeed: this.gateNeed.subarray(0, this.gateCount),
    };
  }
}

function grow<T extends Int32Array | Float64Array>(a: T): T {
  const b = new (a.constructor as new (n: number) => T)(a.length * 2);
  b.set(a);
  return b;
}

/** Min-heap of (time, id) in parallel typed arrays. */
class EventHeap {
  private t = new Float64Array(1024);
  private id = new Int32Array(1024);
  size = 0;

  push(time: number, id: number): void {
    if (this.size === this.t.length) {
      this.t = grow(this.t);
      this.id = grow(this.id);
    }
    let i = this.size++;
    while (i > 0) {
      const p = (i - 1) >> 1;
      if (this.t[p] <= time) break;
      this.t[i] = this.t[p];
      this.id[i] = this.id[p];
      i = p;
    }
    this.t[i] = time;
    this.id[i] = id;
  }

  /** Pops the earliest; its time is in `lastTime`. */
  lastTime = 0;
  pop(): number {
    const top = this.id[0];
    this.lastTime = this.t[0];
    const n = --this.size;
    const t = this.t[n];
    const id = this.id[n];
    let i = 0;
    for (;;) {
      let c = 2 * i + 1;
      if (c >= n) break;
      if (c + 1 < n && this.t[c + 1] < this.t[c]) c++;
      if (this.t[c] >= t) break;
      this.t[i] = this.t[c];
      this.id[i] = this.id[c];
      i = c;
    }
    this.t[i] = t;
    this.id[i] = id;
    return top;
  }
}

export function checkCosts(costs: SimCosts): void {
  for (const [k, v] of Object.entries(costs)) {
    if (typeof v !== "number" || !(v >= 0) || !Number.isFinite(v)) throw new RangeError(`${k} must be finite and >= 0, got ${v}`);
  }
}

/** Run the schedule; throws if some message was never released (a schedule bug). */
export function simulate(schedule: Schedule, costs: SimCosts): SimResult {
  checkCosts(costs);
  const { src, dst, bytes, releasedBy, signals, gateNeed } = schedule.view();
  const m = src.length;
  const n = schedule.members;
  // Messages grouped by the gate that releases them, in the order they were added (CSR).
  const start = new Int32Array(gateNeed.length + 1);
  for (let i = 0; i < m; i++) start[releasedBy[i] + 1]++;
  for (let g = 0; g < gateNeed.length; g++) start[g + 1] += start[g];
  const order = new Int32Array(m);
  const fill = start.slice(0, gateNeed.length);
  for (let i = 0; i < m; i++) order[fill[releasedBy[i]]++] = i;

  const need = Int32Array.from(gateNeed);
  const cpuFree = new Float64Array(n);
  const upFree = new Float64Array(n);
  const sent = new Float64Array(n);
  const heap = new EventHeap();
  let done = 0;
  let last = 0;

  const release = (g: number, t: number) => {
    for (let k = start[g]; k < start[g + 1]; k++) {
      const i = order[k];
      const s = src[i];
      const cpuDone = Math.max(t, cpuFree[s]) + costs.sendMessageS + bytes[i] * costs.sendSPerByte;
      cpuFree[s] = cpuDone;
      const upDone = Math.max(cpuDone, upFree[s]) + bytes[i] * costs.betaSPerByte;
      upFree[s] = upDone;
      sent[s] += bytes[i];
      heap.push(upDone + costs.alphaS, i);
    }
  };

  release(0, 0);
  while (heap.size > 0) {
    const i = heap.pop();
    const t = heap.lastTime;
    const d = dst[i];
    const processed = Math.max(t, cpuFree[d]) + costs.recvMessageS + bytes[i] * costs.recvSPerByte;
    cpuFree[d] = processed;
    done++;
    if (processed > last) last = processed;
    // What this receipt releases is sent by the same handler, before the member's CPU
    // turns to the next receive (gates belong to the member that waits on them).
    const g = signals[i];
    if (g > 0 && --need[g] === 0) release(g, processed);
  }
  if (done !== m) throw new Error(`schedule deadlocked: ${m - done} of ${m} messages never sent`);
  let maxBytesSent = 0;
  for (let s = 0; s < n; s++) maxBytesSent = Math.max(maxBytesSent, sent[s]);
  return { seconds: last, messages: m, maxBytesSent };
}
