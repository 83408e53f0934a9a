// The README's tour page, as written, in headless Chromium: with the client
// bundle the node serves and a static ws token that has expired, a page
// whose connection drops gets every notification posted while it was away,
// in order, once, and `socket.recovered` is true. On each transport.
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { chromium } from "playwright-core";
import { connect, notify, startNode, wsToken } from "./helpers.mjs";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
// The node accepts a ws token up to 5 s past its expiry (clock skew).
const TOKEN_TTL_SECONDS = 1;
const TOKEN_LEEWAY_SECONDS = 5;

let node;
let browser;
let dir;
before(async () => {
  // A page opened from a file has origin `null`: CORS must allow any.
  node = await startNode({ CHANNELS_WS_TOKEN_TTL: `${TOKEN_TTL_SECONDS}`, CHANNELS_CORS_ORIGINS: "*" });
  browser = await chromium.launch({ executablePath: process.env.CHROMIUM ?? "/usr/bin/chromium" });
  dir = await mkdtemp(join(tmpdir(), "channels-tour-"));
});
after(async () => {
  await browser?.close();
  await node?.stop();
  if (dir) await rm(dir, { recursive: true });
});

/** The README's page for `user`, with this node's address, `token`, and `transports` (when given). */
async function tourPage(token, user, transports) {
  const readme = await readFile(new URL("../../README.md", import.meta.url), "utf8");
  const block = readme.match(/```html\n([\s\S]*?)```/);
  assert.ok(block, "the README shows a page");
  let page = block[1].replaceAll("http://127.0.0.1:3000", node.url);
  assert.ok(page.includes("PASTE THE WS TOKEN"), "the README's page takes a pasted ws token");
  page = page.replace("PASTE THE WS TOKEN", token).replaceAll('keycloakID: "alice"', `keycloakID: ${JSON.stringify(user)}`);
  if (transports) {
    const call = `io(${JSON.stringify(node.url)}, {`;
    assert.ok(page.includes(call));
    page = page.replace(call, `${call} transports: ${JSON.stringify(transports)},`);
  }
  const file = join(dir, `tour-${user}.html`);
  await writeFile(file, page);
  return `file://${file}`;
}

// The three wait for their tokens to expire at the same time.
describe("a page whose ws token expired gets what it missed during a drop", { concurrency: true }, () => {
  for (const [name, user, transports, transport] of [
    ["the default transports (polling, then the upgrade)", "alice", undefined, "websocket"],
    ["polling only", "bob", ["polling"], "polling"],
    ["websocket only", "carol", ["websocket"], "websocket"],
  ]) {
    test(name, async () => {
      const tab = await browser.newPage();
      try {
        const text = () => tab.evaluate(() => document.body.innerText.trim());
        const until = async (wanted, ms = 5_000) => {
          const deadline = Date.now() + ms;
          while (!wanted(await text())) {
            if (Date.now() > deadline) throw new Error(`the page shows: ${await text()}`);
            await sleep(20);
          }
        };
        const token = await wsToken(node, user);
        await tab.goto(await tourPage(token, user, transports));
        await until((t) => t.startsWith("connected."));
        if (transport === "websocket") {
          await tab.waitForFunction(() => socket.io.engine.transport.name === "websocket");
        }
        assert.equal((await notify(node, { msg: { n: 1 }, keycloak: user })).status, 200);
        await until((t) => t.endsWith('{"n":1}'));
        await sleep((TOKEN_TTL_SECONDS + TOKEN_LEEWAY_SECONDS) * 1000 + 500);
        await assert.rejects(connect(node, { token, keycloakID: user, channel: "admin" }), /unauthorized/, "the token has expired");

        // The connection drops; three notifications are answered while the
        // page is away (its client waits about a second before it retries).
        await tab.evaluate(() => socket.io.engine.close());
        for (const n of [2, 3, 4]) {
          assert.equal((await notify(node, { msg: { n }, keycloak: user })).status, 200);
        }
        assert.equal(await tab.evaluate(() => socket.connected), false, "the page came back before the posts");

        await until((t) => t.includes('{"n":4}') || t.includes("refused"));
        await sleep(200); // nothing more may come
        assert.equal(await text(), 'connected. {"n":1} recovered. {"n":2} {"n":3} {"n":4}');
        assert.equal(await tab.evaluate(() => socket.recovered), true);
        assert.equal(await tab.evaluate(() => socket.io.engine.transport.name), transport);
      } finally {
        await tab.close();
      }
    });
  }
});
