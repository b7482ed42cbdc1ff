// Session: one token history continued across requests, held on the client (so any
// replica can serve the next turn). Each prompt is the history so far (earlier prompts and
// what was generated, exactly as delivered) followed by the new text; the server's prefix
// cache then prefills only the new tokens. As the Python client's Session.

import type { CallParams, CompletionOptions, LlamaCrabClient, OnChunk } from './client';
import type { Chunk, Completion } from '../gen/llama_crab/v1/llama_crab_pb';

export class Session {
  tokens: number[];

  constructor(
    private readonly client: LlamaCrabClient,
    tokens: number[] = [],
  ) {
    this.tokens = [...tokens];
  }

  /** The next turn: `text` (or token ids, appended as given) after the history. */
  async complete(text: string | number[], options: CompletionOptions = {}, params: CallParams & { onChunk?: OnChunk<Chunk> } = {}): Promise<Completion> {
    // BOS (and other special tokens) only at the start of the history.
    const fresh = typeof text === 'string' ? await this.client.tokenize(text, { addSpecial: !this.tokens.length }) : text;
    const prompt = [...this.tokens, ...fresh];
    const completion = await this.client.complete(prompt, options, params);
    // What was delivered, also after STOP: the history is what the caller saw.
    this.tokens = [...prompt, ...completion.tokenIds];
    return completion;
  }

  /** Forget the history (the next turn starts a new one). */
  reset(): void {
    this.tokens = [];
  }
}
