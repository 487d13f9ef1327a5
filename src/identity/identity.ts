/**
 * Who a provider or a researcher is: an ed25519 key pair (node:crypto). The private key
 * lives in one PEM file with 0600 permissions under the user's config folder, made on
 * first use; the public key, written `ed25519:<base64url of its 32 bytes>`, is what a
 * provider's `--allow` and a config's `providers[].key` name. TLS certificates are made
 * from it (net/tls.ts), and every handshake proof is signed with it (identity/proof.ts).
 */
import { createHash, createPrivateKey, randomBytes, createPublicKey, generateKeyPairSync, sign, verify, type KeyObject } from "node:crypto";
import { link, lstat, mkdir, readFile, unlink, writeFile } from "node:fs/promises";
import os from "node:os";
import path from "node:path";
import { errorMessage, UserError } from "../errors.js";

export interface Identity {
  privateKey: KeyObject;
  publicKey: KeyObject;
  /** The public key as written in configs and on the command line. */
  key: string;
  /** A short form for people to compare: hex of the key's sha256, grouped. */
  fingerprint: string;
  /** The file it was read from (null: made in memory). */
  file: string | null;
}

const PREFIX = "ed25519:";
/** DER prefix of an ed25519 SubjectPublicKeyInfo: the 32 raw key bytes follow it. */
const SPKI_PREFIX = Buffer.from("302a300506032b6570032100", "hex");
/** How a key is written: `ed25519:` and the 32 bytes in base64url. */
export const KEY_PATTERN = /^ed25519:[A-Za-z0-9_-]{43}$/;
const MAX_KEY_FILE_BYTES = 16 * 1024;

/** Where the identity is kept: $NIMBLE_CONFIG_DIR, else $XDG_CONFIG_HOME/nimble, else ~/.config/nimble. */
export function defaultKeyFile(env: NodeJS.ProcessEnv = process.env): string {
  const dir = env.NIMBLE_CONFIG_DIR || path.join(env.XDG_CONFIG_HOME || path.join(os.homedir(), ".config"), "nimble");
  return path.join(dir, "identity.key");
}

/** The key string of a public key. */
export function keyString(publicKey: KeyObject): string {
  const der = publicKey.export({ format: "der", type: "spki" });
  if (publicKey.asymmetricKeyType !== "ed25519" || der.length !== SPKI_PREFIX.length + 32) throw new Error("not an ed25519 public key");
  return PREFIX + der.subarray(SPKI_PREFIX.length).toString("base64url");
}

export function isKeyString(text: string): boolean {
  return KEY_PATTERN.test(text);
}

/** Parse `ed25519:...`; throws UserError naming `where` (a flag, file or field). */
export function parseKey(text: string, where: string): KeyObject {
  const trimmed = text.trim();
  if (!isKeyString(trimmed)) {
    throw new UserError(`${where}: ${JSON.stringify(trimmed.slice(0, 80))} is not a nimble key`, "A key looks like ed25519:<43 characters>; `nimble id` prints this host's.");
  }
  return createPublicKey({ key: Buffer.concat([SPKI_PREFIX, Buffer.from(trimmed.slice(PREFIX.length), "base64url")]), format: "der", type: "spki" });
}

export function fingerprint(key: string): string {
  const hex = createHash("sha256").update(key).digest("hex").slice(0, 16);
  return hex.match(/.{4}/g)!.join(":");
}

function identityOf(privateKey: KeyObject, file: string | null): Identity {
  const publicKey = createPublicKey(privateKey);
  const key = keyString(publicKey);
  return { privateKey, publicKey, key, fingerprint: fingerprint(key), file };
}

/** The identity of a private key already in memory (a key handed to a benchmark's threads). */
export function identityFromKey(privateKey: KeyObject): Identity {
  return identityOf(privateKey, null);
}

/** A fresh identity that lives only in memory (tests, throwaway peers). */
export function ephemeralIdentity(): Identity {
  return identityOf(generateKeyPairSync("ed25519").privateKey, null);
}

/**
 * Read the identity in `file` (default: defaultKeyFile()), making it on first use when
 * `create` is set. A key file others can read is refused: it would let them be you.
 */
export async function loadIdentity(file: string = defaultKeyFile(), opts: { create?: boolean } = {}): Promise<Identity> {
  const abs = path.resolve(file);
  let stat;
  try {
    stat = await lstat(abs);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "ENOENT") throw new UserError(`Cannot read key file ${abs}: ${errorMessage(err)}`);
    if (!opts.create) throw new UserError(`Key file ${abs} does not exist`, "Run `nimble id` to make one there, or pass another --key.");
    return createIdentity(abs);
  }
  if (!stat.isFile()) throw new UserError(`Key file ${abs} is not a regular file`);
  if ((stat.mode & 0o077) !== 0) {
    throw new UserError(`Key file ${abs} can be read by others (mode ${(stat.mode & 0o777).toString(8)})`, `Run \`chmod 600 ${abs}\`.`);
  }
  if (stat.size > MAX_KEY_FILE_BYTES) throw new UserError(`Key file ${abs} is ${stat.size} bytes: not a nimble key`);
  let privateKey: KeyObject;
  try {
    privateKey = createPrivateKey(await readFile(abs, "utf8"));
  } catch (err) {
    throw new UserError(`Key file ${abs} is not a PEM private key: ${errorMessage(err)}`);
  }
  if (privateKey.asymmetricKeyType !== "ed25519") throw new UserError(`Key file ${abs} holds a ${privateKey.asymmetricKeyType} key; nimble keys are ed25519`);
  return identityOf(privateKey, abs);
}

async function createIdentity(abs: string): Promise<Identity> {
  await mkdir(path.dirname(abs), { recursive: true, mode: 0o700 });
  const { privateKey } = generateKeyPairSync("ed25519");
  // Written whole to a private temporary file, then linked into place: a process that
  // makes the key at the same moment never reads half of it, and neither overwrites the other's.
  const tmp = `${abs}.${randomBytes(8).toString("hex")}.tmp`;
  try {
    await writeFile(tmp, privateKey.export({ format: "pem", type: "pkcs8" }), { mode: 0o600, flag: "wx" });
    await link(tmp, abs);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST") return loadIdentity(abs);
    throw new UserError(`Cannot create key file ${abs}: ${errorMessage(err)}`);
  } finally {
    await unlink(tmp).catch(() => {});
  }
  return identityOf(privateKey, abs);
}

export function signWith(identity: Identity, data: Uint8Array): Buffer {
  return sign(null, data, identity.privateKey);
}

/** Whether `signature` is `key`'s over `data`; false for anything malformed. */
export function verifySignature(key: string, data: Uint8Array, signature: Uint8Array): boolean {
  if (!isKeyString(key) || signature.byteLength !== 64) return false;
  try {
    return verify(null, data, parseKey(key, "key"), signature);
  } catch {
    return false;
  }
}
