#!/usr/bin/env node
// Stream a generation from a running `mtpd serve`, from Node.js.
//
//   npm install
//   node generate.js [--address unix:/path | host:port] [--token-file F]
//                    [--max-tokens N] [--json-schema FILE] [--raw] [--json] "prompt"
//
// The .proto is loaded at run time (no generated code): this is all a client in another
// language needs. Text streams to stdout as each step's tokens are accepted; --json
// prints the final result as one JSON object instead. --json-schema constrains the
// output to JSON valid against the schema in FILE (structured output).
"use strict";

const fs = require("fs");
const os = require("os");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO_ROOT = process.env.MTPD_PROTO_ROOT || path.join(__dirname, "..", "protos");

function parseArgs(argv) {
  const args = { address: process.env.MTPD_ADDRESS, maxTokens: null, raw: false, json: false };
  const rest = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--address") args.address = argv[++i];
    else if (a === "--token-file") args.token = fs.readFileSync(argv[++i], "utf8").trim();
    else if (a === "--max-tokens") {
      args.maxTokens = Number(argv[++i]);
      if (!Number.isInteger(args.maxTokens)) {
        console.error(`--max-tokens: not a whole number: ${argv[i]}`);
        process.exit(2);
      }
    }
    else if (a === "--json-schema") args.jsonSchema = fs.readFileSync(argv[++i], "utf8");
    else if (a === "--raw") args.raw = true;
    else if (a === "--json") args.json = true;
    else rest.push(a);
  }
  if (rest.length !== 1) {
    console.error(
      'usage: node generate.js [--address A] [--token-file F] [--max-tokens N] [--json-schema FILE] [--raw] [--json] "prompt"'
    );
    process.exit(2);
  }
  args.prompt = rest[0];
  return args;
}

// The same convention as the Python SDK (common/address.py, mtpd.address): $MTPD_ADDRESS, else the
// user's socket if it exists, else the system service's; a path means a unix socket.
function target(address) {
  if (!address) {
    const base = process.env.XDG_RUNTIME_DIR
      ? path.join(process.env.XDG_RUNTIME_DIR, "mtpd")
      : path.join(os.tmpdir(), `mtpd-${process.getuid()}`);
    const mine = path.join(base, "mtpd.sock");
    const system = "/run/mtpd/mtpd.sock";
    return `unix:${fs.existsSync(mine) || !fs.existsSync(system) ? mine : system}`;
  }
  return address.startsWith("/") || address.startsWith(".") ? `unix:${address}` : address;
}

// As the Python SDK (mtpd.address.socket_distrust): refuse a unix socket, its target or
// its directory owned by another user than us, root or the mtpd service (or one
// $MTPD_TRUSTED_SOCKET_OWNERS names), or a directory anyone may write without the sticky
// bit: another local user could have planted it to read our prompts and token.
function uidOf(name) {
  if (/^\d+$/.test(name)) return Number(name);
  try {
    for (const line of fs.readFileSync("/etc/passwd", "utf8").split("\n")) {
      const fields = line.split(":");
      if (fields[0] === name) return Number(fields[2]);
    }
  } catch {}
  return null;
}

function socketDistrust(socketPath) {
  const names = ["mtpd", ...(process.env.MTPD_TRUSTED_SOCKET_OWNERS || "").split(",")];
  const trusted = new Set([process.geteuid(), 0]);
  for (const name of names.map((n) => n.trim()).filter(Boolean)) {
    const uid = uidOf(name);
    if (uid !== null) trusted.add(uid);
  }
  let link, target, folder;
  try {
    link = fs.lstatSync(socketPath);
    target = fs.statSync(socketPath);
    folder = fs.statSync(path.dirname(fs.realpathSync(socketPath)));
  } catch (err) {
    return err.code === "ENOENT" ? null : `${socketPath}: cannot inspect it: ${err.message}`;
  }
  for (const [what, info] of [["the socket", link], ["its target", target], ["its directory", folder]]) {
    if (!trusted.has(info.uid)) {
      return `${socketPath}: ${what} belongs to uid ${info.uid}, not to you, root or mtpd`;
    }
  }
  if (folder.mode & 0o002 && !(folder.mode & 0o1000)) {
    return `${socketPath}: anyone may replace it (its directory is writable by all)`;
  }
  return null;
}

function main() {
  const args = parseArgs(process.argv.slice(2));
  const where = target(args.address);
  const why = where.startsWith("unix:") ? socketDistrust(where.slice(5)) : null;
  if (why) {
    console.error(`mtpd: refusing to connect: ${why}`);
    process.exit(1);
  }
  const definition = protoLoader.loadSync("mtpd/v1/inference.proto", {
    includeDirs: [PROTO_ROOT],
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
  });
  const { Inference } = grpc.loadPackageDefinition(definition).mtpd.v1;
  const client = new Inference(where, grpc.credentials.createInsecure());
  const metadata = new grpc.Metadata();
  if (args.token) metadata.set("authorization", `Bearer ${args.token}`);

  // Absent options take the server's defaults; proto3 `optional` fields are set only
  // when given.
  const options = {};
  if (args.maxTokens !== null) options.max_tokens = args.maxTokens;
  if (args.jsonSchema !== undefined) options.structured_output = { json_schema: args.jsonSchema };
  const call = args.raw
    ? client.Generate({ prompt: args.prompt, options }, metadata)
    : client.Chat({ messages: [{ role: "user", content: args.prompt }], options }, metadata);

  const result = { text: "", token_ids: [], accepted_drafts: 0 };
  call.on("data", (chunk) => {
    result.text += chunk.text;
    result.token_ids.push(...chunk.token_ids);
    result.accepted_drafts += chunk.accepted_drafts;
    if (!args.json) process.stdout.write(chunk.text);
    if (chunk.finish_reason !== "FINISH_REASON_UNSPECIFIED") {
      result.finish_reason = chunk.finish_reason.replace("FINISH_REASON_", "").toLowerCase();
      result.usage = chunk.usage;
      result.request_id = chunk.request_id;
    }
  });
  call.on("error", (err) => {
    console.error(`mtpd: ${grpc.status[err.code]}: ${err.details}`);
    process.exitCode = 1;
  });
  call.on("end", () => {
    if (args.json) console.log(JSON.stringify(result));
    else process.stdout.write("\n");
    client.close();
  });
}

main();
