// The chat page in real headless Chromium, driven over the DevTools protocol (no npm package,
// no downloaded browser). Run by `cargo test` (tests/chat.rs), which starts the chat example and
// passes CHAT_URL (the page), CHAT_BIN (the example, for its CLI), CHROMIUM (the browser) and
// SCREENSHOT (where to write a PNG of the page).
import { after, before, test } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join as joinPath } from "node:path";

const { CHAT_URL, CHAT_BIN, CHROMIUM, SCREENSHOT } = process.env;
const ROOM = `room-${process.pid}`;

/** A headless Chromium and a DevTools connection to it. */
async function launch() {
  const profile = await mkdtemp(joinPath(tmpdir(), "chat-chromium-"));
  const proc = spawn(
    CHROMIUM,
    [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--window-size=1000,700",
      `--user-data-dir=${profile}`,
      "--remote-debugging-port=0",
      "about:blank",
    ],
    { stdio: ["ignore", "ignore", "pipe"] },
  );
  const endpoint = await new Promise((resolve, reject) => {
    let err = "";
    proc.stderr.on("data", (d) => {
      err += d;
      const m = err.match(/DevTools listening on (ws:\/\/\S+)/);
      if (m) resolve(m[1]);
    });
    proc.on("exit", (code) => reject(new Error(`chromium exited (${code}): ${err}`)));
  });
  const ws = new WebSocket(endpoint);
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = reject;
  });
  let nextId = 0;
  const pending = new Map();
  ws.onmessage = (m) => {
    const msg = JSON.parse(m.data);
    const waiter = pending.get(msg.id);
    if (!waiter) return;
    pending.delete(msg.id);
    msg.error ? waiter.reject(new Error(msg.error.message)) : waiter.resolve(msg.result);
  };
  const send = (method, params = {}, sessionId) =>
    new Promise((resolve, reject) => {
      const id = ++nextId;
      pending.set(id, { resolve, reject });
      ws.send(JSON.stringify({ id, method, params, sessionId }));
    });
  const close = async () => {
    ws.close();
    proc.kill();
    await new Promise((r) => setTimeout(r, 200)); // let it let go of its profile
    await rm(profile, { recursive: true, force: true, maxRetries: 5 });
  };
  return { send, close };
}

/** A new tab at `url`. */
async function openPage(browser, url) {
  const { targetId } = await browser.send("Target.createTarget", { url: "about:blank" });
  const { sessionId } = await browser.send("Target.attachToTarget", { targetId, flatten: true });
  const page = {
    send: (method, params) => browser.send(method, params, sessionId),
    async eval(expression) {
      const r = await page.send("Runtime.evaluate", {
        expression,
        awaitPromise: true,
        returnByValue: true,
      });
      if (r.exceptionDetails) throw new Error(r.exceptionDetails.exception?.description ?? expression);
      return r.result.value;
    },
    async goto(to) {
      await page.send("Page.navigate", { url: to });
      await waitFor(page, "document.readyState === 'complete' && !!document.getElementById('join')");
    },
  };
  await page.send("Page.enable");
  await page.goto(url);
  return page;
}

/** Waits until `expression` is truthy in `page` (10 s at most). */
async function waitFor(page, expression, what = expression) {
  const deadline = Date.now() + 10_000;
  for (;;) {
    try {
      if (await page.eval(expression)) return;
    } catch {
      // the page is (re)loading
    }
    if (Date.now() > deadline) {
      const body = await page.eval("document.body.innerText").catch((e) => String(e));
      throw new Error(`timed out waiting for ${what}; the page shows:\n${body}`);
    }
    await new Promise((r) => setTimeout(r, 50));
  }
}

const text = (id) => `document.getElementById(${JSON.stringify(id)}).innerText`;
const has = (page, id, s) => waitFor(page, `${text(id)}.includes(${JSON.stringify(s)})`, `${id} to show "${s}"`);

async function join(page, name) {
  await page.eval(`document.getElementById('room-name').value = ${JSON.stringify(ROOM)}`);
  await page.eval(`document.getElementById('user-name').value = ${JSON.stringify(name)}`);
  await page.eval("document.querySelector('#join button').click()");
  await waitFor(page, "document.getElementById('room').classList.contains('open')", `${name} to join`);
}

async function say(page, message) {
  await page.eval(`document.getElementById('text').value = ${JSON.stringify(message)}`);
  await page.eval("document.querySelector('#send button').click()");
}

let browser;
before(async () => {
  browser = await launch();
});
after(async () => {
  await browser?.close();
});

test("two pages chat, a reload gets the history, and the CLI joins in", async () => {
  const ann = await openPage(browser, CHAT_URL);
  const bob = await openPage(browser, CHAT_URL);
  await join(ann, "ann");
  await join(bob, "bob");
  // Who is online, on both pages.
  await has(ann, "members", "bob");
  await has(bob, "members", "ann");

  await say(ann, "hello from ann");
  await has(bob, "messages", "hello from ann");
  await say(bob, "hi ann");
  await has(ann, "messages", "hi ann");
  await has(ann, "messages", "hello from ann"); // her own message, shown once

  // A page that reloads gets the history.
  await bob.goto(CHAT_URL);
  await join(bob, "bob");
  await has(bob, "messages", "hello from ann");
  await has(bob, "messages", "hi ann");

  // The terminal client, in the same room.
  const cli = spawn(CHAT_BIN, ["cli", "--room", ROOM, "--name", "carol", "--url", CHAT_URL], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  let out = "";
  cli.stdout.on("data", (d) => (out += d));
  try {
    const cliSees = async (s) => {
      const deadline = Date.now() + 10_000;
      while (!out.includes(s)) {
        if (Date.now() > deadline) throw new Error(`the CLI never printed "${s}":\n${out}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };
    await cliSees("[ann] hello from ann"); // the history
    await has(ann, "members", "carol");
    cli.stdin.write("hi from the terminal\n");
    await has(ann, "messages", "hi from the terminal");
    await say(ann, "hello carol");
    await cliSees("[ann] hello carol");
  } finally {
    cli.kill();
  }
  await has(ann, "messages", "carol left");

  const count = await (await fetch(new URL(`/agents/chat-room/${ROOM}/count`, CHAT_URL))).json();
  assert.deepEqual(count, { messages: 4 });

  const shot = await ann.send("Page.captureScreenshot", { format: "png" });
  await writeFile(SCREENSHOT, Buffer.from(shot.data, "base64"));
});

test("a page without a name is told why", async () => {
  const page = await openPage(browser, CHAT_URL);
  await page.eval("document.getElementById('user-name').value = ''"); // remembered from before
  await page.eval("document.querySelector('#join button').click()");
  await has(page, "error", "pick a name of 1 to 32 characters");
});
