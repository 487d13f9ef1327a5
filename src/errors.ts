/**
 * Errors that reach the user. `cli.ts` is the one place that turns them into exit codes.
 * A UserError is the user's to fix (bad config, unreachable provider, wrong token) and
 * carries a hint; anything else is a bug or an environment failure and exits 1.
 */
export class UserError extends Error {
  constructor(
    message: string,
    readonly hint?: string,
    readonly exitCode: number = 1,
  ) {
    super(message);
    this.name = "UserError";
  }
}

/** A config file that does not validate: exit code 2, message names file, line and field. */
export class ConfigError extends UserError {
  constructor(message: string, hint?: string) {
    super(message, hint, 2);
    this.name = "ConfigError";
  }
}

/** Exit code of a job stopped by an error in the task's code (config errors exit 2). */
export const EXIT_TASK_ERROR = 3;

/** The job stopped on an error in the researcher's task: `where` names the file and function. */
export class TaskFailed extends UserError {
  readonly kind = "task";
  constructor(
    message: string,
    readonly where: string | undefined,
    hint?: string,
  ) {
    super(message, hint, EXIT_TASK_ERROR);
    this.name = "TaskFailed";
  }
}

/** Invalid data from a peer (provider, worker, ring neighbour). The link it came on is dropped. */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
