#!/usr/bin/env node
/**
 * Cosmos DB test server for the embedding-jobs test suite.
 *
 * Starts @vercel/cosmosdb-server (pinned to 1.0.1 in package.json: everything
 * below leans on its internals) from its JS API over plain HTTP with
 * keep-alive, and fills the gaps the job store hits on the stock server by
 * wrapping its exported route table from here, outside node_modules:
 *
 *   - reading a missing document answers 404 (stock: 500);
 *   - patch `filter_predicate` conditions are evaluated as written (stock
 *     lower-cases them, so `c.attemptCount` or 'Queued' never match) and
 *     against the target document only;
 *   - transactional batches take the partition key from the request header,
 *     support Patch, and are all-or-nothing: a failed operation restores the
 *     container and answers its status with 424 for every other operation;
 *   - a query sent with a partition key header sees only that partition;
 *   - item `ttl` / container `defaultTtl` are enforced: expired items are
 *     purged before every request;
 *   - the change feed is incremental: every write takes the next number of a
 *     global sequence, which serves as the feed's etag / continuation;
 *   - the account document advertises http endpoints, so clients work with
 *     endpoint discovery left on;
 *   - faults can be switched on per container for outage drills:
 *     `POST /_faults {"collection": NAME, "mode": "hang" | "fail" | null}`.
 *     "hang" holds that container's requests unanswered until the fault is
 *     cleared, then serves them (a stalled network that recovers, so a write
 *     a client gave up on may still land); "fail" answers 503;
 *   - requests are counted per database, so tests can assert what an
 *     operation costs in round trips: `GET /_requests?db=NAME` answers
 *     `{"total": N, "kinds": {"batch": N, "read": N, ...}}` (faulted
 *     requests included). The server charges a flat 1 RU per request, so
 *     there is no request-charge figure worth reporting.
 *
 * Everything goes through the route table except the write sequence, which
 * has to see every stored document and so wraps Documents#_set.
 *
 * Usage: node launcher.js [--host 127.0.0.1] [--port 0] [--exit-on-stdin-close]
 * Port 0 lets the OS pick a free port. Once listening it prints one line on
 * stdout: "cosmos-server ready http://HOST:PORT/". With --exit-on-stdin-close
 * it exits when its stdin closes, so it dies with the process that started it.
 */
"use strict";

const LIB = "@vercel/cosmosdb-server/lib";
const { createHttpServer } = require(LIB);
const routes = require(`${LIB}/routes`);
const Items = require(`${LIB}/account/items`).default;
const Documents = require(`${LIB}/account/documents`).default;
const documentOperations = require(`${LIB}/handler/_document-operations`);
const { patchOperation } = require(`${LIB}/handler/_patch-operations`);
const { parsePartitionKey } = require(`${LIB}/utils/get-partition-from-header`);
const readBody = require(`${LIB}/json`).default;
const readItems = require(`${LIB}/handler/_read-items`).default;

const stockHandler = name => require(`${LIB}/handler/${name}`).default;
const PK_HEADER = "x-ms-documentdb-partitionkey";
const NO_PARTITION_HEADER = Symbol("no partition key header");

// --- Global write sequence -------------------------------------------------
// Every write stores a fresh document object through Items#_set (stored
// versions are never mutated in place), so a WeakMap keyed by that object
// records its sequence number and write time exactly, and forgets versions
// that were replaced, deleted or rolled back without any bookkeeping.
let lastSeq = 0;
const versions = new WeakMap();
Documents.prototype._set = function setWithSequence(data) {
  const stored = Items.prototype._set.call(this, data);
  lastSeq += 1;
  versions.set(stored, { seq: lastSeq, writtenAt: Date.now() });
  return stored;
};

const fail = (statusCode, message) => ({
  statusCode,
  body: { code: statusCode === 412 ? "PreconditionFailed" : "BadRequest", message },
});

/** Partition key value named by the request header, e.g. '["t1"]' -> "t1". */
function headerPartition(req) {
  const raw = req.headers[PK_HEADER];
  if (raw === undefined) return NO_PARTITION_HEADER;
  const parsed = JSON.parse(raw);
  const value = Array.isArray(parsed) ? parsed[0] : parsed;
  // SDKs send [{}] for "this item has no partition key value".
  const isEmptyObject = value !== null && typeof value === "object" && !Object.keys(value).length;
  return isEmptyObject ? undefined : value;
}

function findDocument(collection, id, partitionKeyHeader) {
  return collection.document(id, parsePartitionKey(partitionKeyHeader, id)).read();
}

// --- TTL --------------------------------------------------------------------
/** Delete items whose ttl (or the container's defaultTtl) has run out. */
function purgeExpired(account) {
  const now = Date.now();
  for (const database of account.databases._data.values()) {
    for (const collection of database.collections._data.values()) {
      const { defaultTtl } = collection.read();
      // Without a container TTL, Cosmos DB ignores item ttl too.
      if (defaultTtl === undefined || defaultTtl === null) continue;
      const docs = collection.documents;
      for (const item of [...docs._data.values()]) {
        const doc = item.read();
        const ttl = doc.ttl ?? defaultTtl;
        if (ttl === -1) continue;
        // _ts has whole seconds only; the recorded write time makes ttl=1 mean one second.
        const writtenAt = versions.get(doc)?.writtenAt ?? doc._ts * 1000;
        if (now >= writtenAt + ttl * 1000) docs.delete(doc.id, docs._getPartition(doc));
      }
    }
  }
}

// --- Point reads ------------------------------------------------------------
/** The stock handler dereferences the missing document and answers 500. */
function readDocument(account, req, res, params, stock) {
  const collection = account.database(params.dbId).collection(params.collId);
  if (collection.read() && !findDocument(collection, params.docId, req.headers[PK_HEADER])) {
    res.statusCode = 404;
    return { code: "NotFound", message: "Entity with the specified id does not exist in the system." };
  }
  return stock(account, req, res, params);
}

// --- Patch ------------------------------------------------------------------
/** null when the filter predicate ("from c where ...") holds for doc, else the failure. */
function conditionFailure(collection, doc, condition) {
  const match = /^\s*from\s+(\w+)\s+where\s+([\s\S]+)$/i.exec(condition);
  if (!match) return fail(400, `Invalid filter predicate: ${condition}`);
  let rows;
  try {
    rows = collection.documents._getQuery(`SELECT * FROM ${match[1]} WHERE ${match[2]}`).exec([doc]).result;
  } catch (err) {
    return fail(400, `Invalid filter predicate: ${err.message}`);
  }
  return rows.length ? null : fail(412, "Condition specified in the patch request is not satisfied.");
}

/** Stock patch, but with the condition checked here (see conditionFailure). */
function patch(collection, { condition, ...input }) {
  const doc = findDocument(collection, input.id, input.partitionKey);
  // Missing documents and stale etags are left to the stock code, which reports them first.
  if (doc && condition && !(input.ifMatch && input.ifMatch !== doc._etag)) {
    const failure = conditionFailure(collection, doc, condition);
    if (failure) return failure;
  }
  return patchOperation(collection, input);
}

async function patchDocument(account, req, res, { dbId, collId, docId }) {
  const body = await readBody(req);
  const operations = Array.isArray(body) ? body : body.operations;
  if (!Array.isArray(operations)) {
    res.statusCode = 400;
    return { code: "BadRequest", message: "Invalid patch request: check syntax of patch specification." };
  }
  const result = patch(account.database(dbId).collection(collId), {
    id: docId,
    partitionKey: req.headers[PK_HEADER],
    ifMatch: req.headers["if-match"],
    operations,
    condition: Array.isArray(body) ? undefined : body.condition,
  });
  res.statusCode = result.statusCode;
  return result.body;
}

// --- Transactional batch ----------------------------------------------------
function batchOperation(collection, op, partition) {
  const docs = collection.documents;
  const body = op.resourceBody;
  if (body && op.operationType !== "Patch" && docs._getPartition(body) !== partition) {
    return fail(400, "The partition key of the operation does not match the batch partition key.");
  }
  switch (op.operationType) {
    case "Create": return documentOperations.createOperation(collection, op);
    case "Upsert": return documentOperations.upsertOperation(collection, op);
    case "Replace": return documentOperations.replaceOperation(collection, op);
    case "Read": return documentOperations.readOperation(collection, op);
    case "Delete": return documentOperations.deleteOperation(collection, op);
    case "Patch":
      return patch(collection, {
        id: op.id,
        partitionKey: op.partitionKey,
        ifMatch: op.ifMatch,
        operations: (body || {}).operations || [],
        condition: (body || {}).condition,
      });
    default: return fail(400, `Operation type '${op.operationType}' is not supported in Batch.`);
  }
}

/**
 * All-or-nothing batch. The Python SDK sends no per-operation partition key,
 * only the request header, and always asks for an atomic batch.
 */
async function batchDocuments(account, req, res, { dbId, collId }) {
  const operations = await readBody(req);
  const collection = account.database(dbId).collection(collId);
  if (!collection.read()) {
    res.statusCode = 404;
    return {};
  }
  if (!Array.isArray(operations)) {
    res.statusCode = 400;
    return { message: "Invalid request body" };
  }
  const partitionKey = req.headers[PK_HEADER];
  const partition = headerPartition(req);
  const docs = collection.documents;
  // Shallow copies suffice because stored document objects are never mutated.
  const snapshot = { _data: new Map(docs._data), _index: new Map(docs._index), _ridCount: docs._ridCount };
  const results = [];
  try {
    for (const [index, op] of operations.entries()) {
      const input = { ...op, partitionKey: op.partitionKey ?? partitionKey };
      const result = batchOperation(collection, input, partition);
      if (result.statusCode >= 400) {
        Object.assign(docs, snapshot);
        // 207 keeps the SDK on its batch path: it raises CosmosBatchOperationError from the bodies.
        res.statusCode = 207;
        return operations.map((_, i) => (i === index
          ? { statusCode: result.statusCode, requestCharge: 0, message: (result.body || {}).message }
          : { statusCode: 424, requestCharge: 0 }));
      }
      const resourceBody = result.body;
      results.push({
        statusCode: result.statusCode, requestCharge: 1, eTag: resourceBody?._etag, resourceBody,
      });
    }
  } catch (err) {
    Object.assign(docs, snapshot);
    throw err;
  }
  return results;
}

// --- Queries ----------------------------------------------------------------
/** With a partition key header, run the query over that partition's documents only. */
async function queryDocuments(account, req, res, params, stock) {
  const partition = headerPartition(req);
  if (partition === NO_PARTITION_HEADER) return stock(account, req, res, params);
  return readItems(req, res, "Documents", async ({ continuation, maxItemCount }) => {
    const body = await readBody(req);
    if (!body.query) {
      res.statusCode = 400;
      return { message: "missing query" };
    }
    const docs = account.database(params.dbId).collection(params.collId).documents;
    // A view of the container that inherits everything but holds one partition's documents.
    const scoped = Object.create(docs);
    const inPartition = ([, item]) => docs._getPartition(item.read()) === partition;
    scoped._data = new Map([...docs._data].filter(inPartition));
    try {
      return scoped.query(body, { continuation, maxItemCount });
    } catch (err) {
      if (!err.badRequest) throw err;
      res.statusCode = 400;
      return { message: err.message };
    }
  });
}

// --- Change feed ------------------------------------------------------------
/**
 * Incremental change feed: the latest version of each document written after
 * the continuation, in write order; the etag is the last sequence returned.
 */
function readDocuments(account, req, res, params, stock) {
  if (!req.headers["a-im"]) return stock(account, req, res, params);
  const collection = account.database(params.dbId).collection(params.collId);
  if (!collection.read()) {
    res.statusCode = 404;
    return {};
  }
  // The stock response code answers every a-im request with etag "1" (304 when
  // a continuation is given); without the header the feed is left to us.
  delete req.headers["a-im"];
  const ifNoneMatch = req.headers["if-none-match"];
  let after = 0;
  if (ifNoneMatch === "*") after = lastSeq; // start from now
  else if (ifNoneMatch) after = Number(ifNoneMatch.replace(/"/g, ""));
  const since = req.headers["if-modified-since"] ? Date.parse(req.headers["if-modified-since"]) : -Infinity;
  const maxItemCount = parseInt(req.headers["x-ms-max-item-count"], 10);
  const changes = [...collection.documents._data.values()]
    .map(item => ({ doc: item.read(), ...versions.get(item.read()) }))
    .filter(change => change.seq > after && change.writtenAt >= since)
    .sort((a, b) => a.seq - b.seq)
    .slice(0, maxItemCount > 0 ? maxItemCount : undefined);
  res.setHeader("etag", `"${changes.length ? changes[changes.length - 1].seq : after}"`);
  res.setHeader("x-ms-item-count", String(changes.length));
  if (!changes.length) res.statusCode = 304;
  return {
    _rid: collection.read()._rid, Documents: changes.map(change => change.doc), _count: changes.length,
  };
}

// --- Account ----------------------------------------------------------------
/** The stock account document names https endpoints; this server speaks http. */
function readAccount(account) {
  const props = account.read();
  const http = loc => ({
    ...loc, databaseAccountEndpoint: loc.databaseAccountEndpoint.replace(/^https:/, "http:"),
  });
  return {
    ...props,
    writableLocations: props.writableLocations.map(http),
    readableLocations: props.readableLocations.map(http),
  };
}

// --- Route table ------------------------------------------------------------
// The server looks up routes.default on every request, so replacing it here
// reroutes requests without touching node_modules. Overrides receive the stock
// handler as a fifth argument to delegate to.
const overrides = new Map([
  [stockHandler("read-meta"), readAccount],
  [stockHandler("read-document"), readDocument],
  [stockHandler("read-documents"), readDocuments],
  [stockHandler("patch-document"), patchDocument],
  [stockHandler("batch-documents"), batchDocuments],
  [stockHandler("query-documents"), queryDocuments],
]);
const stockRoute = routes.default;
routes.default = req => {
  const route = stockRoute(req);
  if (!route) return route;
  const [params, handler] = route;
  const override = overrides.get(handler);
  return [params, (account, request, res, routeParams) => {
    purgeExpired(account);
    return override
      ? override(account, request, res, routeParams, handler)
      : handler(account, request, res, routeParams);
  }];
};

// --- Main -------------------------------------------------------------------
function parseArgs(argv) {
  const args = { host: "127.0.0.1", port: 0, exitOnStdinClose: false };
  for (let i = 0; i < argv.length; i += 1) {
    if (argv[i] === "--host") args.host = argv[(i += 1)];
    else if (argv[i] === "--port") args.port = Number(argv[(i += 1)]);
    else if (argv[i] === "--exit-on-stdin-close") args.exitOnStdinClose = true;
    else throw new Error(`unknown argument: ${argv[i]}`);
  }
  return args;
}

// --- Faults -----------------------------------------------------------------
const faults = new Map(); // collection name -> "hang" | "fail"
let held = []; // [collection, resume] of requests held by a "hang" fault

function collectionOf(url) {
  const match = /^\/dbs\/[^/]+\/colls\/([^/?]+)/.exec(url);
  return match ? decodeURIComponent(match[1]) : null;
}

function setFault(req, res) {
  let raw = "";
  req.on("data", chunk => { raw += chunk; });
  req.on("end", () => {
    const { collection, mode } = JSON.parse(raw || "{}");
    if (mode) faults.set(collection, mode);
    else faults.delete(collection);
    const release = held.filter(([name]) => faults.get(name) !== "hang");
    held = held.filter(([name]) => faults.get(name) === "hang");
    release.forEach(([, resume]) => resume());
    res.writeHead(200, { "content-type": "application/json" });
    res.end(JSON.stringify({ faults: Object.fromEntries(faults), held: held.length }));
  });
}

// --- Request counts ---------------------------------------------------------
const requestCounts = new Map(); // database id -> { total, kinds: { kind: count } }

/** What a request does, in the words of the SDK's operations. */
function requestKind(req) {
  const { method, headers } = req;
  if (headers["x-ms-cosmos-is-batch-request"]) return "batch";
  if (headers["x-ms-documentdb-isquery"] || headers["content-type"] === "application/query+json") return "query";
  const path = req.url.split("?")[0];
  if (/\/docs\/[^/]+$/.test(path)) {
    return { GET: "read", PATCH: "patch", PUT: "replace", DELETE: "delete" }[method] || method;
  }
  if (/\/docs$/.test(path)) {
    if (method === "GET") return headers["a-im"] ? "change feed" : "read feed";
    if (method === "POST") return /^true$/i.test(headers["x-ms-documentdb-is-upsert"] || "") ? "upsert" : "create";
  }
  return `${method} ${path.replace(/^\/dbs\/[^/]+/, "").split("/")[1] || "database"}`;
}

function countRequest(req) {
  const match = /^\/dbs\/([^/?]+)/.exec(req.url);
  if (!match) return;
  const database = decodeURIComponent(match[1]);
  const counts = requestCounts.get(database) || { total: 0, kinds: {} };
  const kind = requestKind(req);
  counts.total += 1;
  counts.kinds[kind] = (counts.kinds[kind] || 0) + 1;
  requestCounts.set(database, counts);
}

function readRequestCounts(req, res) {
  const database = new URL(req.url, "http://localhost").searchParams.get("db");
  req.resume();
  res.writeHead(200, { "content-type": "application/json" });
  res.end(JSON.stringify(requestCounts.get(database) || { total: 0, kinds: {} }));
}

function withTestHooks(server) {
  const stock = server.listeners("request");
  server.removeAllListeners("request");
  server.on("request", (req, res) => {
    if (req.url === "/_faults" && req.method === "POST") return setFault(req, res);
    if (req.url.startsWith("/_requests?") && req.method === "GET") return readRequestCounts(req, res);
    countRequest(req);
    const name = collectionOf(req.url);
    const mode = name === null ? undefined : faults.get(name);
    const serve = () => stock.forEach(listener => listener.call(server, req, res));
    if (mode === "fail") {
      req.resume();
      res.writeHead(503, { "content-type": "application/json" });
      return res.end(JSON.stringify({ code: "ServiceUnavailable", message: `fault injected on ${name}` }));
    }
    if (mode === "hang") {
      // Unread, the body waits in the socket until the request is served.
      held.push([name, serve]);
      return undefined;
    }
    return serve();
  });
  return server;
}

const args = parseArgs(process.argv.slice(2));
const server = withTestHooks(createHttpServer({ keepAlive: true }));
// Never close idle connections from this side: a client reusing a pooled
// connection at the moment the server drops it would see a spurious error.
server.keepAliveTimeout = 0;
server.listen(args.port, args.host, () => {
  process.stdout.write(`cosmos-server ready http://${args.host}:${server.address().port}/\n`);
});
if (args.exitOnStdinClose) {
  process.stdin.on("end", () => process.exit(0));
  process.stdin.resume();
}
