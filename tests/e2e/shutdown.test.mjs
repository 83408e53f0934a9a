// A node's graceful stop (SIGTERM) right after its clients closed: it ends
// within its shutdown timeout, with exit code 0.
import assert from "node:assert/strict";
import { test } from "node:test";
import { io } from "socket.io-client";
import { startNode, wsToken } from "./helpers.mjs";

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// A closing long-polling client sends its namespace DISCONNECT, then its
// engine.io close on another request. A stop that came between the two
// found an engine.io session with no socket.io socket, which the node's
// close did not close, and its pending long-poll held the stop for the
// whole timeout (exit code 1): 2 stops in 10 before the node closed such a
// session itself. A race, so it is run ten times.
test("a node stopped right after a long-polling client closed exits in time, ten times", async () => {
  const exits = [];
  for (let i = 0; i < 10; i++) {
    const node = await startNode({ CHANNELS_SHUTDOWN_TIMEOUT: "3" });
    const auth = { token: await wsToken(node, "mia"), keycloakID: "mia", channel: "b2b" };
    const socket = io(node.url, { auth, transports: ["polling"], forceNew: true, reconnection: false });
    await new Promise((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("connect_error", reject);
    });
    await sleep(300);
    socket.close();
    await node.stop();
    exits.push(node.child.exitCode);
  }
  assert.deepEqual(exits, Array(10).fill(0));
});

// A client between engine.io's handshake and its socket.io CONNECT (a slow
// page, or one whose auth callback is still fetching a token) has a
// long-poll pending and no socket.io socket. socketioxide's close did not
// close such a session, so the stop waited for its connect timeout (10 s
// here) or the next ping, past the shutdown timeout: exit code 1 after 3 s.
test("a node stopped while a client is between its handshake and its CONNECT exits at once", async () => {
  const node = await startNode({ CHANNELS_SHUTDOWN_TIMEOUT: "3" });
  const open = await (await fetch(`${node.url}/socket.io/?EIO=4&transport=polling`)).text();
  const { sid } = JSON.parse(open.slice(1));
  // Nothing is queued before a CONNECT: this poll waits.
  const poll = fetch(`${node.url}/socket.io/?EIO=4&transport=polling&sid=${sid}`).then((r) => r.text());
  await sleep(200);
  const began = Date.now();
  await node.stop();
  const took = Date.now() - began;
  assert.equal(node.child.exitCode, 0);
  assert.ok(took < 1500, `the stop took ${took} ms`);
  // The poll is answered with engine.io's close packet.
  assert.equal(await poll, "1");
});
