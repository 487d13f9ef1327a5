// results/ring.md from results/ring.json: one table per labelled run ("before", "after"...),
// then the change between the first and the last label at each size.

const mb = (x) => (x / 1e6).toFixed(0);

function table(run) {
  const out = [
    `${run.date.slice(0, 10)}, N = ${run.world}, ${run.cores} cores (${run.cpu}), codec ${run.codec}; medians of alternating runs.`,
    "",
    "| part | size | Nimble (TLS) bus bandwidth | gloo | Nimble / gloo | plain ws (reference) | TLS / plain | of the link (Nimble, gloo) | CPU s per all-reduce (Nimble, gloo) | load |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ];
  for (const r of run.rows) {
    const plain = r.plain ? `${mb(r.plain.busbw)} MB/s` : "";
    const tlsCost = r.plain ? (r.nimble.busbw / r.plain.busbw).toFixed(2) : "";
    const link = r.linkBytesPerS ? `${((100 * r.nimble.busbw) / r.linkBytesPerS).toFixed(0)}%, ${((100 * r.gloo.busbw) / r.linkBytesPerS).toFixed(0)}%` : "";
    out.push(`| ${r.part} | ${r.mib} MiB | ${mb(r.nimble.busbw)} MB/s | ${mb(r.gloo.busbw)} MB/s | ${r.ratio.toFixed(2)}x | ${plain} | ${tlsCost} | ${link} | ${r.nimble.cpuSeconds === undefined ? "" : `${r.nimble.cpuSeconds.toFixed(3)}, ${r.gloo.cpuSeconds.toFixed(3)}`} | ${r.load.toFixed(2)} |`);
  }
  // --variants rows: Nimble TLS with some environment changed, alternated with the rest
  for (const r of run.rows) {
    const variants = Object.entries(r).filter(([k, v]) => v && typeof v === "object" && "busbw" in v && !["nimble", "gloo", "plain"].includes(k));
    if (variants.length) out.push("", `Variants at ${r.part} ${r.mib} MiB (same alternation): Nimble ${mb(r.nimble.busbw)} MB/s; ${variants.map(([k, v]) => `${k} ${mb(v.busbw)} MB/s (Nimble / ${k} ${(r.nimble.busbw / v.busbw).toFixed(2)}${v.cpuSeconds === undefined ? "" : `; CPU ${v.cpuSeconds.toFixed(3)} s per all-reduce against Nimble's ${r.nimble.cpuSeconds.toFixed(3)}`})`).join("; ")}.`);
  }
  return out;
}

export function ringMarkdown(all) {
  const labels = Object.keys(all.runs);
  const out = [
    "# bench:ring",
    "",
    "Ring all-reduce of float32 among N ranks, each a process of its own: Nimble over TLS 1.3",
    "links made as providers make them, against torch.distributed gloo in the same run.",
    "Bus bandwidth = 2(N-1)/N * bytes / seconds per all-reduce. `npm run bench:ring`.",
    "",
  ];
  for (const l of labels) out.push(`## ${l}`, "", ...table(all.runs[l]), "");
  const [from, to] = all.runs.before && all.runs.after ? ["before", "after"] : [labels[0], labels[labels.length - 1]];
  if (labels.length > 1) {
    const first = all.runs[from];
    const last = all.runs[to];
    out.push(`## ${from} -> ${to} (separate runs: the load differed)`, "", "| part | size | Nimble before | after | after / before | gloo before | gloo after |", "| --- | --- | --- | --- | --- | --- | --- |");
    for (const r of last.rows) {
      const b = first.rows.find((x) => x.part === r.part && x.mib === r.mib);
      if (!b) continue;
      out.push(`| ${r.part} | ${r.mib} MiB | ${mb(b.nimble.busbw)} MB/s | ${mb(r.nimble.busbw)} MB/s | ${(r.nimble.busbw / b.nimble.busbw).toFixed(2)}x | ${mb(b.gloo.busbw)} MB/s | ${mb(r.gloo.busbw)} MB/s |`);
    }
    out.push("");
  }
  return out.join("\n");
}
