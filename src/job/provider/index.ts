/** `nimble provide` (DESIGN.md, "job/"): the server, its job, each rank's lifecycle, the relay, stats and testing aids. */
export { Provider } from "./server.js";
export { STATS_INTERVAL_MS, type LinkBytes, type LogLevel, type ProviderEvent, type ProviderOptions, type RankStats, type StatsEvent, type WorkerEvent, type WorkerState } from "./types.js";
