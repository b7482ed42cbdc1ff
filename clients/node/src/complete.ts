#!/usr/bin/env node
// Stream a completion to stdout:
//   llama-crab-complete "Once upon a time" --server localhost:50051 --max-tokens 32 [--json] [--token T]
// --server defaults to $LLAMA_CRAB_SERVER (as the Python CLI), else $LLAMA_CRAB_ADDR, else localhost:50051.
// Ctrl-C is STOP: the RPC is cancelled (the server frees the slot at once); exit 130.

import { parseArgs } from 'node:util';

import { toJson } from '@bufbuild/protobuf';

import { LlamaCrabClient, LlamaCrabError, defaultAddress, proto, type CompletionOptions } from './index';

function usage(message?: string): never {
  if (message) process.stderr.write(`llama-crab-complete: ${message}\n`);
  process.stderr.write(
    'usage: llama-crab-complete PROMPT [--server HOST:PORT] [--max-tokens N] [--temperature T]\n' +
      '                           [--stop TEXT]... [--seed N] [--json] [--token TOKEN]\n',
  );
  process.exit(2);
}

async function main(): Promise<void> {
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
    usage(err instanceof Error ? err.message : String(err));
  }
  const { values, positionals } = parsed;
  if (positionals.length !== 1) usage('exactly one PROMPT is needed');
  const options: CompletionOptions = { maxTokens: Number(values['max-tokens']), stopSequences: values.stop };
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
    const stream = client.stream(positionals[0], options, { signal: abort.signal });
    for await (const chunk of stream) {
      process.stdout.write(values.json ? JSON.stringify({ type: 'chunk', ...toJson(proto.ChunkSchema, chunk) as object }) + '\n' : chunk.text);
    }
    const completion = await stream.completion;
    if (values.json) process.stdout.write(JSON.stringify({ type: 'completion', ...toJson(proto.CompletionSchema, completion) as object }) + '\n');
    else process.stdout.write('\n');
    process.exitCode = interrupted ? 130 : 0;
  } catch (err) {
    const e = err instanceof LlamaCrabError ? err : null;
    const where = e?.field ? ` (field ${e.field})` : '';
    process.stderr.write(`llama-crab-complete: ${e?.status ?? 'ERROR'}${where}: ${err instanceof Error ? err.message : String(err)}\n`);
    process.exitCode = 1;
  } finally {
    client.close();
  }
}

void main();
