// results/ring.md from results/ring.json: one table per labelled run ("before", "after"...),
// then the change between the first and the last label at each size.

const mb = (x) => (x / 1e6).toFixed(0);

function table(run) {
  const out = [
    `${run.date.slice(0, 10)}, N = ${run.world}, ${run.cores} cores (${run.cpu}), codec ${run.codec}; medians of alternating runs.`,
    "",
    "| part | size | Nimble (TLS) bus bandwidth | gloo | Nimble / gloo | plain ws (reference) | TLS / plain | of the link (Nimble, gloo) | load |",
    "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
  ];
  for (const r of run.rows) {
    const plain = r.plain ? `${mb(r.plain.busbw)} MB/s` : "";
    const tlsCost = r.plain ? (r.nimble.busbw / r.plain.busbw).toFixed(2) : "";
    const link = r.linkBytesPerS ? `${((100 * r.nimble.busbw) / r.linkBytesPerS).toFixed(0)}%, ${((100 * r.gloo.busbw) / r.linkBytesPerS).toFixed(0)}%` : "";
    out.push(`| ${r.part} | ${r.mib} MiB | ${mb(r.nimble.busbw)} MB/s | ${mb(r.gloo.busbw)} MB/s | ${r.ratio.toFixed(2)}x | ${plain} | ${tlsCost} | ${link} | ${r.load.toFixed(2)} |`);
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
  if (labels.length > 1) {
    const first = all.runs[labels[0]];
    const last = all.runs[labels[labels.length - 1]];
    out.push(`## ${labels[0]} -> ${labels[labels.length - 1]}`, "", "| part | size | Nimble before | after | after / before | gloo before | gloo after |", "| --- | --- | --- | --- | --- | --- | --- |");
    for (const r of last.rows) {
      const b = first.rows.find((x) => x.part === r.part && x.mib === r.mib);
      if (!b) continue;
      out.push(`| ${r.part} | ${r.mib} MiB | ${mb(b.nimble.busbw)} MB/s | ${mb(r.nimble.busbw)} MB/s | ${(r.nimble.busbw / b.nimble.busbw).toFixed(2)}x | ${mb(b.gloo.busbw)} MB/s | ${mb(r.gloo.busbw)} MB/s |`);
    }
    out.push("");
  }
  return out.join("\n");
}
