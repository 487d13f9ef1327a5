/** A worker table for the live views: aligned columns, one of them (the state) in colour. */
import { Box, Text } from "ink";
import type { ReactNode } from "react";
import { alignColumns } from "./format.js";

export interface StateTableProps {
  header: readonly string[];
  rows: { key: string | number; cells: string[]; color?: string; after?: ReactNode }[];
  /** Columns aligned right (numbers). */
  right: ReadonlySet<number>;
  /** The column drawn in the row's colour. */
  stateColumn: number;
}

export function StateTable({ header, rows, right, stateColumn }: StateTableProps) {
  const [head, ...body] = alignColumns(
    header,
    rows.map((r) => r.cells),
    right,
  );
  const join = (cells: string[]) => cells.join("  ");
  return (
    <Box flexDirection="column" marginTop={1}>
      <Text bold wrap="truncate">
        {join(head!)}
      </Text>
      {rows.map((r, k) => {
        const cells = body[k]!;
        return (
          <Text key={r.key} wrap="truncate">
            {stateColumn > 0 ? `${join(cells.slice(0, stateColumn))}  ` : ""}
            <Text color={r.color}>{cells[stateColumn]}</Text>
            {stateColumn < cells.length - 1 ? `  ${join(cells.slice(stateColumn + 1))}` : ""}
            {r.after}
          </Text>
        );
      })}
    </Box>
  );
}
