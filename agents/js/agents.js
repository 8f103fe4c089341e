// agents.js: the browser (and Node) client of `agents`, speaking `agents.v1.json`.
//
// One dependency-free ES module, served by the runtime at `/agents.js`:
//
//   import { connect } from "/agents.js";
//   const room = await connect("ws://localhost:8080/agents/chat-room/lobby?token=..");
//   room.on("event", (e) => console.log(e));
//   await room.call("post", ["hello"]);
//
// Calls have deadlines and can be cancelled (an AbortSignal); errors are AgentError with the
// protocol's `kind`; events and the shared state arrive on listeners; streaming calls are async
// iterables paced with credit; the connection comes back by itself (backoff 100 ms doubling to
// 5 s) unless the server refused it with a 4xxx close code.

/** The timeout of calls that set none, in milliseconds. */
export const DEFAULT_TIMEOUT_MS = 30_000;
const MIN_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 5_000;
/** How many chunks of a stream may be on their way ahead of its reader. */
const STREAM_WINDOW = 32;

/** A failed call or connection: `kind` is one of the protocol's kinds (`app`, `unknown_method`,
 * `bad_args`, `timeout`, `cancelled`, `overloaded`, `cycle`, `internal`), or `refused` for a
 * connection the server would not take; `data` is the application's typed error (kind `app`). */
export class AgentError extends Error {
  constructor(kind, message, data, code) {
    super(message);
    this.name = "AgentError";
    this.kind = kind;
    if (data !== undefined) this.data = data;
    if (code !== undefined) this.code = code;
  }

  static from(err) {
    return new AgentError(err?.kind ?? "internal", err?.message ?? String(err), err?.data);
  }
}

/** Connects to the agent at `url` (`ws://host/agents/{class}/{name}`) and resolves once the
 * server has identified itself. Options: `timeout` (ms, the default of every call),
 * `reconnect` (default true), `WebSocket` (a constructor, for runtimes without a global one). */
export async function connect(url, options = {}) {
  const client = new AgentClient(url, options);
  await client.ready;
  return client;
}

/** A connection to one agent. Use `connect(url)`, which waits for it to be open. */
export class AgentClient {
  constructor(url, options = {}) {
    this.url = url;
    this.timeout = options.timeout ?? DEFAULT_TIMEOUT_MS;
    this.reconnect = options.reconnect ?? true;
    this.WebSocket = options.WebSocket ?? globalThis.WebSocket;
    /** `{ class, name, conn }` as the server last announced them. */
    this.identity = undefined;
    /** The agent's shared state, as last received. */
    this.state = undefined;
    this.closed = false;
    this._listeners = new Map();
    /** Events that came before the first `event` listener (up to 1,024). */
    this._early = [];
    this._pending = new Map();
    this._nextId = 1;
    this._socket = undefined;
    this._backoff = MIN_BACKOFF_MS;
    this.ready = new Promise((resolve, reject) => {
      this._open(resolve, reject);
    });
    this.ready.catch(() => {});
  }

  /** Listens to `event` (an event the agent sent), `state` (the shared state, on connect and
   * on every change), `open` (identity), `close` ({code, reason}), `error` (an error frame).
   * Returns a function that stops listening.
   *
   * The first `event` listener also gets the events that came before it was added (since the
   * connection opened: what `on_connect` sent, say), so none is lost to it. */
  on(name, listener) {
    if (!this._listeners.has(name)) this._listeners.set(name, new Set());
    this._listeners.get(name).add(listener);
    if (name === "event" && this._early) {
      const early = this._early;
      this._early = undefined;
      queueMicrotask(() => early.forEach((event) => listener(event)));
    }
    return () => this._listeners.get(name)?.delete(listener);
  }

  _emit(name, value) {
    if (name === "event" && this._early) {
      if (this._early.length < 1024) this._early.push(value);
      return;
    }
    for (const listener of this._listeners.get(name) ?? []) {
      try {
        listener(value);
      } catch (e) {
        queueMicrotask(() => {
          throw e;
        });
      }
    }
  }

  /** Calls `method` with `args` (an array). Resolves with its result; rejects with an
   * AgentError. Options: `timeout` (ms), `signal` (an AbortSignal that cancels the call). */
  call(method, args = [], options = {}) {
    const timeout = options.timeout ?? this.timeout;
    return new Promise((resolve, reject) => {
      this._start(method, args, timeout, options.signal, {
        reply: (frame) => (frame.err ? reject(AgentError.from(frame.err)) : resolve(frame.ok)),
        fail: reject,
      });
    });
  }

  /** Calls the streaming callable `method`: an async iterable of its chunks, taken at the
   * reader's pace (at most 32 ahead). Breaking out of the loop cancels the call. Options as for
   * `call`; the timeout applies to each wait for a chunk. */
  stream(method, args = [], options = {}) {
    const client = this;
    const timeout = options.timeout ?? this.timeout;
    return {
      [Symbol.asyncIterator]() {
        const chunks = [];
        let waiting = null;
        let ended = false;
        let failure = null;
        let taken = 0;
        let timer = null;
        const wake = () => {
          if (waiting) {
            const w = waiting;
            waiting = null;
            w();
          }
        };
        const id = client._start(method, args, timeout, options.signal, {
          credit: STREAM_WINDOW,
          chunk: (data) => {
            chunks.push(data);
            wake();
          },
          reply: (frame) => {
            if (frame.err) failure = AgentError.from(frame.err);
            ended = true;
            wake();
          },
          fail: (e) => {
            failure = e;
            ended = true;
            wake();
          },
          streaming: true,
        });
        return {
          async next() {
            while (chunks.length === 0 && !ended) {
              await new Promise((resolve) => {
                waiting = resolve;
                timer = setTimeout(() => {
                  failure = new AgentError("timeout", `no chunk within ${timeout} ms`);
                  ended = true;
                  client._cancel(id);
                  resolve();
                }, timeout);
              });
              clearTimeout(timer);
            }
            if (chunks.length > 0) {
              taken += 1;
              if (taken === STREAM_WINDOW / 2) {
                client._send({ type: "credit", id, chunks: taken });
                taken = 0;
              }
              return { value: chunks.shift(), done: false };
            }
            if (failure) {
              const e = failure;
              failure = null;
              throw e;
            }
            return { value: undefined, done: true };
          },
          async return() {
            if (!ended) client._cancel(id);
            ended = true;
            return { value: undefined, done: true };
          },
        };
      },
    };
  }

  /** Sends a message to the agent's `on_message` (any JSON). */
  send(data) {
    if (!this._send({ type: "message", data })) {
      throw new AgentError("internal", "not connected; the message was not sent");
    }
  }

  /** Closes the connection for good (code 1000). Calls in flight fail. */
  close() {
    this.closed = true;
    this._socket?.close(1000);
    this._failAll(new AgentError("internal", "the client was closed"));
  }

  _start(method, args, timeout, signal, waiter) {
    if (this.closed) {
      waiter.fail(new AgentError("internal", "the client was closed; the call was not sent"));
      return undefined;
    }
    if (signal?.aborted) {
      waiter.fail(new AgentError("cancelled", "the call was cancelled before it was sent"));
      return undefined;
    }
    const id = this._nextId++;
    const entry = { ...waiter, timer: undefined };
    this._pending.set(id, entry);
    if (!waiter.streaming) {
      entry.timer = setTimeout(() => {
        if (this._pending.delete(id)) {
          this._send({ type: "cancel", id });
          waiter.fail(new AgentError("timeout", `no reply to \`${method}\` within ${timeout} ms`));
        }
      }, timeout);
    }
    signal?.addEventListener("abort", () => {
      if (this._cancel(id)) {
        waiter.fail(new AgentError("cancelled", `\`${method}\` was cancelled`));
      }
    });
    const send = () => {
      if (waiter.credit) this._send({ type: "credit", id, chunks: waiter.credit });
      this._send({ type: "call", id, method, args, deadline_ms: timeout });
    };
    if (this._isOpen()) {
      send();
    } else {
      // Sent once connected (within the call's timeout).
      entry.sendOnOpen = send;
    }
    return id;
  }

  /** Takes call `id` out and tells the server; whether it was in flight. */
  _cancel(id) {
    const entry = this._pending.get(id);
    if (!entry) return false;
    this._pending.delete(id);
    clearTimeout(entry.timer);
    this._send({ type: "cancel", id });
    return true;
  }

  _isOpen() {
    return this._socket?.readyState === 1 && this.identity !== undefined;
  }

  _send(frame) {
    if (this._socket?.readyState !== 1) return false;
    this._socket.send(JSON.stringify(frame));
    return true;
  }

  /** Fails the calls in flight (those `which` selects). */
  _failAll(error, which = () => true) {
    for (const [id, entry] of this._pending) {
      if (!which(entry)) continue;
      clearTimeout(entry.timer);
      this._pending.delete(id);
      entry.fail(error);
    }
  }

  _open(resolve, reject) {
    let identified = false;
    let socket;
    try {
      socket = new this.WebSocket(this.url, ["agents.v1.json"]);
    } catch (e) {
      reject(new AgentError("internal", `could not connect to ${this.url}: ${e.message ?? e}`));
      return;
    }
    this._socket = socket;
    socket.onmessage = (message) => {
      let frame;
      try {
        frame = JSON.parse(message.data);
      } catch {
        return;
      }
      switch (frame.type) {
        case "identity":
          identified = true;
          this.identity = { class: frame.class, name: frame.name, conn: frame.conn };
          this._backoff = MIN_BACKOFF_MS;
          for (const entry of this._pending.values()) {
            const send = entry.sendOnOpen;
            entry.sendOnOpen = undefined;
            send?.();
          }
          this._emit("open", this.identity);
          resolve?.(this);
          resolve = undefined;
          reject = undefined;
          break;
        case "reply": {
          const entry = this._pending.get(frame.id);
          if (!entry) break;
          this._pending.delete(frame.id);
          clearTimeout(entry.timer);
          entry.reply(frame);
          break;
        }
        case "chunk":
          this._pending.get(frame.id)?.chunk?.(frame.data);
          break;
        case "event":
          this._emit("event", frame.data);
          break;
        case "state":
          this.state = frame.state;
          this._emit("state", frame.state);
          break;
        case "error":
          this._emit("error", AgentError.from(frame));
          break;
      }
    };
    socket.onclose = (event) => {
      const { code, reason } = event;
      const first = reject !== undefined;
      this.identity = undefined;
      this._emit("close", { code, reason });
      // Calls sent on this connection may or may not have run; those not sent yet wait.
      this._failAll(
        new AgentError(
          "internal",
          "the connection closed before the reply arrived; the call may or may not have run",
        ),
        (entry) => entry.sendOnOpen === undefined,
      );
      const refused = code >= 4000 && code < 5000 && !identified;
      let error;
      if (refused) {
        error = new AgentError("refused", reason || `refused with code ${code}`, undefined, code);
      } else if (first && !identified) {
        error = new AgentError("internal", `could not connect to ${this.url} (close code ${code})`);
      }
      if (error || this.closed || !this.reconnect) {
        // Refused (no use trying again), never connected, or closed for good.
        this.closed = true;
        error ??= new AgentError("internal", "the connection closed");
        this._failAll(error);
        reject?.(error);
        reject = undefined;
        return;
      }
      const delay = this._backoff;
      this._backoff = Math.min(this._backoff * 2, MAX_BACKOFF_MS);
      setTimeout(() => {
        if (!this.closed) this._open(undefined, undefined);
      }, delay);
    };
    socket.onerror = () => {};
  }
}
