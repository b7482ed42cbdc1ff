// Stream a completion, STOP after a few chunks by leaving the loop, read the final
// Completion; then a chat reply with a tool. Run: node dist/examples/stream.js (after
// `npm run build`), with LLAMA_CRAB_SERVER=host:port.

import { LlamaCrabClient, StopReason } from '../src/index';

async function main(): Promise<void> {
  const client = new LlamaCrabClient();
  try {
    const stream = client.stream('Once upon a time', { maxTokens: 64, stopSequences: ['\n\n'] });
    let chunks = 0;
    for await (const chunk of stream) {
      process.stdout.write(chunk.text);
      if (++chunks === 8) break; // STOP: the server frees the slot at once
    }
    const done = await stream.completion;
    console.log(`\n[${StopReason[done.stopReason]}: ${done.usage?.completionTokens} tokens]`);

    const reply = await client.chat([{ role: 'user', content: 'What is the weather in Paris?' }], { maxTokens: 64 }, {
      tools: [{ type: 'function', function: { name: 'get_weather', parameters: { type: 'object', properties: { city: { type: 'string' } } } } }],
      onChunk: (chunk) => {
        for (const call of chunk.delta.tool_calls ?? []) process.stdout.write(call.function.arguments);
        process.stdout.write(chunk.delta.content ?? '');
      },
    });
    console.log('\n', reply.choices[0].finish_reason, reply.choices[0].message.tool_calls ?? []);
  } finally {
    client.close();
  }
}

void main();
