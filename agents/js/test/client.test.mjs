// Tests of agents.js against a real server: run by `cargo test` (tests/js_client.rs), which
// starts the server and passes its address in AGENTS_URL (`ws://127.0.0.1:PORT`) and
// AGENTS_HTTP (`http://127.0.0.1:PORT`).
import { after, test } from "node:test";
import assert from "node:assert/strict";

const BASE = process.env.AGENTS_URL;
const HTTP = process.env.AGENTS_HTTP;
// The module as the runtime serves it (what a page imports), not the file in the repo.
const served = await fetch(`${HTTP}/agents.js`);
assert.equal(served.status, 200);
assert.match(served.headers.get("content-type"), /javascript/);
const source = await served.text();
const { connect, AgentError } = await import(
  `data:text/javascript,${encodeURIComponent(source)}`
);

const url = (name, token = "ok") => `${BASE}/agents/js-echo/${name}?token=${token}`;

// Every client a test opens is closed at the end, even when the test failed half-way (an open
// socket would keep the process alive).
const opened = [];
after(() => opened.forEach((c) => c.close()));
async function open(name, token) {
  const client = await connect(url(name, token));
  opened.push(client);
  return client;
}

/** The next `name` from `client`, within 10 s. */
function next(client, name) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ${name} within 10 s`)), 10_000);
    const off = client.on(name, (value) => {
      off();
      clearTimeout(timer);
      resolve(value);
    });
  });
}

test("calls, typed errors, unknown methods, bad arguments", async () => {
  const c = await open("calls");
  assert.equal(c.identity.class, "js-echo");
  assert.equal(c.identity.name, "calls");
  assert.equal(await c.call("add", [5]), 5);
  assert.equal(await c.call("add", [2]), 7);
  await assert.rejects(c.call("fail", ["no"]), (e) => {
    assert.ok(e instanceof AgentError);
    assert.equal(e.kind, "app");
    assert.deepEqual(e.data, { Refused: "no" });
    return true;
  });
  await assert.rejects(c.call("nope"), { kind: "unknown_method" });
  await assert.rejects(c.call("add", ["five"]), { kind: "bad_args" });
  c.close();
});

test("events and shared state", async () => {
  const a = await open("room");
  const b = await open("room");
  const event = next(b, "event");
  const state = next(b, "state");
  await a.call("shout", ["hi"]);
  assert.deepEqual(await event, { said: "hi" });
  await a.call("set_topic", ["rust"]);
  assert.deepEqual(await state, { topic: "rust" });
  assert.deepEqual(b.state, { topic: "rust" });
  // A new connection gets the state on connect.
  const c = await open("room");
  assert.deepEqual(c.state ?? (await next(c, "state")), { topic: "rust" });
  a.close();
  b.close();
  c.close();
});

test("a message reaches on_message, and its failure comes back as an error", async () => {
  const c = await open("messages");
  const echoed = next(c, "event");
  c.send("ping");
  assert.deepEqual(await echoed, { said: "ping" });
  const failed = next(c, "error");
  c.send("fail");
  const e = await failed;
  assert.equal(e.kind, "app");
  assert.equal(e.message, "refused to echo");
  c.close();
});

test("streaming with credit, and breaking out cancels", async () => {
  const c = await open("streams");
  const all = [];
  for await (const n of c.stream("count", [100])) all.push(n);
  assert.deepEqual(all, Array.from({ length: 100 }, (_, i) => i));
  // Take 3 of an endless stream: the server stops it.
  const some = [];
  for await (const n of c.stream("count", [1_000_000_000])) {
    some.push(n);
    if (some.length === 3) break;
  }
  assert.deepEqual(some, [0, 1, 2]);
  assert.equal(await c.call("add", [0]), 0, "the connection is still good");
  c.close();
});

test("deadlines and cancellation", async () => {
  const c = await open("slow");
  await assert.rejects(c.call("sleep", [2000], { timeout: 100 }), { kind: "timeout" });
  const abort = new AbortController();
  const call = c.call("sleep", [2000], { signal: abort.signal });
  setTimeout(() => abort.abort(), 50);
  await assert.rejects(call, { kind: "cancelled" });
  assert.equal(await c.call("add", [1]), 1);
  c.close();
});

test("a refused handshake says why, with its code", async () => {
  await assert.rejects(open("locked", "wrong"), (e) => {
    assert.equal(e.kind, "refused");
    assert.equal(e.code, 4401);
    assert.equal(e.message, "who are you?");
    return true;
  });
});

test("the client reconnects after the server restarts, and carries on", async () => {
  const c = await open("durable");
  assert.equal(await c.call("add", [1]), 1);
  const closed = next(c, "close");
  const reopened = next(c, "open");
  const restart = await fetch(`${HTTP}/test/restart`, { method: "POST" });
  assert.equal(restart.status, 200);
  assert.equal((await closed).code, 1001);
  await reopened;
  assert.equal(await c.call("add", [1]), 2, "the agent's data survived the restart");
  // Events reach the reconnected client.
  const event = next(c, "event");
  await c.call("shout", ["again"]);
  assert.deepEqual(await event, { said: "again" });
  c.close();
});

test("what on_connect sends reaches the first event listener, however late", async () => {
  const c = await open("greeted");
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.deepEqual(await next(c, "event"), { said: "welcome" });
  c.close();
});
