#!/usr/bin/env node
'use strict';
// Stream a completion to stdout:
//   node complete.js "Once upon a time" --server localhost:50051 --max-tokens 32 [--json] [--token T]
// --server defaults to $LLAMA_CRAB_SERVER (as the Python CLI), else $LLAMA_CRAB_ADDR, else localhost:50051.
// Ctrl-C cancels the RPC (the server frees the slot at once) and exits 130.

const { parseArgs } = require('node:util');
const { LlamaCrabClient, defaultAddress } = require('./index.js');

function usage(message) {
  if (message) process.stderr.write(`complete.js: ${message}\n`);
  process.stderr.write(
    'usage: node complete.js PROMPT [--server HOST:PORT] [--max-tokens N] [--temperature T]\n' +
      '                        [--stop TEXT]... [--seed N] [--json] [--token TOKEN]\n',
  );
  process.exit(2);
}

async function main() {
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: {
        server: { type: 'string', default: defaultAddress() },
        'max-tokens': { type: 'string', default: '16' },
        temperature: { type: 'string' },
        seed: { type: 'string' },
        stop: { type: 'string', multiple: true, default: [] },
        token: { type: 'string', default: process.env.LLAMA_CRAB_TOKEN },
        json: { type: 'boolean', default: false },
      },
    });
  } catch (err) {
    usage(err.message);
  }
  const { values, positionals } = parsed;
  if (positionals.length !== 1) usage('exactly one PROMPT is needed');
  const options = { max_tokens: Number(values['max-tokens']), stop_sequences: values.stop };
  if (values.temperature !== undefined) options.temperature = Number(values.temperature);
  if (values.seed !== undefined) options.seed = Number(values.seed);

  const client = new LlamaCrabClient(values.server, { token: values.token });
  const abort = new AbortController();
  let interrupted = false;
  process.once('SIGINT', () => {
    interrupted = true;
    abort.abort();
  });
  try {
    const completion = await client.complete(positionals[0], options, {
      signal: abort.signal,
      onChunk: (chunk) => {
        process.stdout.write(values.json ? JSON.stringify({ type: 'chunk', ...chunk }) + '\n' : chunk.text);
      },
    });
    if (values.json) process.stdout.write(JSON.stringify({ type: 'completion', ...completion }) + '\n');
    else process.stdout.write('\n');
    process.exitCode = interrupted ? 130 : 0;
  } catch (err) {
    const where = err.field ? ` (field ${err.field})` : '';
    process.stderr.write(`complete.js: ${err.status || 'ERROR'}${where}: ${err.message}\n`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

main();
