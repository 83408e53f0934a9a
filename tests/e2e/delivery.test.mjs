// The three targeting variants, over each transport of the official client.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { notify, startNode, upgraded, userSocket } from "./helpers.mjs";

let node;
before(async () => (node = await startNode()));
after(() => node.stop());

const TRANSPORTS = {
  "polling then websocket upgrade (the client default)": ["polling", "websocket"],
  "websocket only": ["websocket"],
  "polling only": ["polling"],
};

for (const [name, transports] of Object.entries(TRANSPORTS)) {
  describe(name, () => {
    test("each variant reaches exactly its sockets", async () => {
      const tag = transports.join("-");
      const alice = `alice-${tag}`;
      const bob = `bob-${tag}`;
      const admin = `admin-${tag}`;
      const b2b = `b2b-${tag}`;
      const aliceAdmin = await userSocket(node, alice, admin, transports);
      const aliceB2b = await userSocket(node, alice, b2b, transports);
      const bobAdmin = await userSocket(node, bob, admin, transports);
      if (transports.length === 2) await upgraded(aliceAdmin);
      try {
        let r = await notify(node, { msg: "to channel", channel: admin });
        assert.deepEqual([r.status, r.body.variant], [200, "channel"]);
        assert.equal(await aliceAdmin.nextNotification(), "to channel");
        assert.equal(await bobAdmin.nextNotification(), "to channel");

        r = await notify(node, { msg: "to user", keycloak: alice });
        assert.deepEqual([r.status, r.body.variant], [200, "user"]);
        assert.equal(await aliceAdmin.nextNotification(), "to user");
        assert.equal(await aliceB2b.nextNotification(), "to user");

        r = await notify(node, { msg: "to user in channel", keycloak: alice, channel: b2b });
        assert.deepEqual([r.status, r.body.variant], [200, "user_channel"]);
        assert.equal(await aliceB2b.nextNotification(), "to user in channel");

        // Nothing else arrived anywhere.
        for (const socket of [aliceAdmin, aliceB2b, bobAdmin]) {
          assert.equal(await socket.nextNotification(300), null);
        }
      } finally {
        for (const socket of [aliceAdmin, aliceB2b, bobAdmin]) socket.close();
      }
    });
  });
}

test("a disconnected socket is unreachable at once", async () => {
  const socket = await userSocket(node, "leaver", "admin", ["websocket"]);
  socket.close();
  // The server notices the close; then the gauge is back to zero.
  const deadline = Date.now() + 5000;
  let sockets;
  do {
    await new Promise((resolve) => setTimeout(resolve, 50));
    const text = await (await fetch(`${node.url}/metrics`)).text();
    sockets = Number(text.match(/^channels_sockets (\d+)/m)[1]);
  } while (sockets !== 0 && Date.now() < deadline);
  assert.equal(sockets, 0);
  const r = await notify(node, { msg: "anyone?", keycloak: "leaver" });
  assert.equal(r.status, 200);
});
