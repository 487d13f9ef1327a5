import { readFile, stat } from "node:fs/promises";
import { errorMessage, UserError } from "../errors.js";
import { parseKey } from "./identity.js";

const MAX_ALLOW_FILE_BYTES = 1024 * 1024;

/**
 * The coordinator keys a provider admits (key mode): `--allow KEY` values and the lines of
 * `--allow-file` files (blank lines and `#` comments skipped; a key may be followed by a
 * comment naming whose it is). A malformed key names its flag or file and line.
 */
export async function allowedKeys(inline: string[], files: string[]): Promise<string[]> {
  const keys: string[] = [];
  for (const k of inline) {
    parseKey(k, "--allow");
    keys.push(k.trim());
  }
  for (const file of files) {
    let text: string;
    try {
      const s = await stat(file);
      if (!s.isFile()) throw new Error("not a regular file");
      if (s.size > MAX_ALLOW_FILE_BYTES) throw new Error(`${s.size} bytes is more than an allow file may have`);
      text = await readFile(file, "utf8");
    } catch (err) {
      throw new UserError(`Cannot read --allow-file ${file}: ${errorMessage(err)}`);
    }
    text.split("\n").forEach((raw, i) => {
      const line = raw.replace(/#.*/, "").trim();
      if (!line) return;
      const key = line.split(/\s+/)[0]!;
      parseKey(key, `${file}:${i + 1}`);
      keys.push(key);
    });
  }
  return [...new Set(keys)];
}
