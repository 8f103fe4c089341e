// Type declarations of agents.js. With the declarations `typescript()` generates from an agent's
// Rust definitions (`#[agent(typescript)]`), calls, events and state are checked:
//
//   import { connect } from "./agents.js";
//   import type { Methods, Event, State } from "./shop.js";
//   const shop = await connect<Methods, Event, State>(url);

/** One method: its positional arguments, its result, its application error. */
export interface MethodSpec {
  args: unknown[];
  result: unknown;
  error: unknown;
}

/** A failed call or connection. */
export declare class AgentError<D = unknown> extends Error {
  /** `app`, `unknown_method`, `bad_args`, `timeout`, `cancelled`, `overloaded`, `cycle`,
   * `internal`, or `refused` for a connection the server would not take. */
  kind: string;
  /** The application's typed error (kind `app`). */
  data?: D;
  /** The close code of a refusal (4000 to 4999). */
  code?: number;
}

export interface CallOptions {
  /** Milliseconds. */
  timeout?: number;
  signal?: AbortSignal;
}

export interface ConnectOptions {
  timeout?: number;
  reconnect?: boolean;
  WebSocket?: unknown;
}

export declare const DEFAULT_TIMEOUT_MS: number;

export declare class AgentClient<
  M extends { [K in keyof M]: MethodSpec } = Record<string, MethodSpec>,
  E = unknown,
  S = unknown,
> {
  readonly url: string;
  readonly identity: { class: string; name: string; conn: string } | undefined;
  readonly state: S | undefined;
  readonly closed: boolean;
  readonly ready: Promise<AgentClient<M, E, S>>;
  constructor(url: string, options?: ConnectOptions);
  call<K extends keyof M & string>(method: K, args: M[K]["args"], options?: CallOptions): Promise<M[K]["result"]>;
  stream<K extends keyof M & string>(method: K, args: M[K]["args"], options?: CallOptions): AsyncIterable<M[K]["result"]>;
  on(name: "event", listener: (event: E) => void): () => void;
  on(name: "state", listener: (state: S) => void): () => void;
  on(name: "open", listener: (identity: { class: string; name: string; conn: string }) => void): () => void;
  on(name: "close", listener: (close: { code: number; reason: string }) => void): () => void;
  on(name: "error", listener: (error: AgentError) => void): () => void;
  send(data: unknown): void;
  close(): void;
}

export declare function connect<
  M extends { [K in keyof M]: MethodSpec } = Record<string, MethodSpec>,
  E = unknown,
  S = unknown,
>(url: string, options?: ConnectOptions): Promise<AgentClient<M, E, S>>;
