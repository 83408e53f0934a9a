// GET /socket.io/socket.io.js serves the same client the suite runs.
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { startNode } from "./helpers.mjs";

let node;
before(async () => (node = await startNode()));
after(() => node.stop());

const dist = join(dirname(createRequire(import.meta.url).resolve("socket.io-client/package.json")), "dist");

for (const [file, type] of [
  ["socket.io.js", "application/javascript"],
  ["socket.io.min.js", "application/javascript"],
  ["socket.io.js.map", "application/json"],
  ["socket.io.min.js.map", "application/json"],
]) {
  test(`${file} is the npm package's file with its content type and caching headers`, async () => {
    const response = await fetch(`${node.url}/socket.io/${file}`);
    assert.equal(response.status, 200);
    assert.match(response.headers.get("content-type"), new RegExp(`^${type}`));
    assert.match(response.headers.get("cache-control"), /max-age=\d+/);
    const etag = response.headers.get("etag");
    assert.ok(etag);
    const served = Buffer.from(await response.arrayBuffer());
    assert.ok(served.equals(await readFile(join(dist, file))), "served bytes differ from the npm package");
    const again = await fetch(`${node.url}/socket.io/${file}`, { headers: { "if-none-match": etag } });
    assert.equal(again.status, 304);
  });
}

test("an unknown file under /socket.io/ is a 404", async () => {
  const response = await fetch(`${node.url}/socket.io/nope.js`);
  assert.equal(response.status, 404);
});
