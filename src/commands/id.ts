import { defaultKeyFile, loadIdentity } from "../identity/identity.js";

export interface IdCommandOptions {
  key?: string;
  json?: boolean;
}

/** `nimble id`: this user's identity key (made on first use), to give to the other side. */
export async function idCommand(options: IdCommandOptions): Promise<void> {
  const identity = await loadIdentity(options.key ?? defaultKeyFile(), { create: true });
  const out = { key: identity.key, fingerprint: identity.fingerprint, file: identity.file };
  if (options.json) process.stdout.write(`${JSON.stringify(out)}\n`);
  else process.stdout.write(`${identity.key}\n  fingerprint: ${identity.fingerprint}\n  kept in:     ${identity.file}\n`);
}
