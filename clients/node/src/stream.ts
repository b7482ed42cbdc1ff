// A server-streaming call (chunks, then one final message) as an async iterable of chunks
// and a promise of the final result. Leaving the loop early (break, return, throw) or an
// AbortSignal is STOP: the call is cancelled and the result holds exactly what was handed
// out, as the Python client's stream does.

import { status as grpcStatus, type ClientReadableStream } from '@grpc/grpc-js';

import { InternalError, toError } from './errors';

/** What a stream's messages are: a chunk to hand out, or the end with the final result. */
export type Step<C, F> = { chunk: C } | { final: F };

export class Stream<C, F> implements AsyncIterable<C> {
  /** The final result: the server's, or after STOP the delivered chunks'. */
  readonly completion: Promise<F>;
  private readonly delivered: C[] = [];
  private readonly queue: C[] = [];
  private waiting: ((r: IteratorResult<C>) => void) | null = null;
  private failWaiting: ((e: unknown) => void) | null = null;
  private ended = false;
  private failure: unknown = null;
  private resolve!: (f: F) => void;
  private reject!: (e: unknown) => void;
  private settled = false;
  private readonly onAbort = (): void => this.stop();

  constructor(
    private readonly call: ClientReadableStream<unknown>,
    convert: (message: unknown) => Step<C, F>,
    private readonly afterStop: (delivered: C[]) => F,
    private readonly signal?: AbortSignal,
  ) {
    this.completion = new Promise<F>((resolve, reject) => {
      this.resolve = resolve;
      this.reject = reject;
    });
    this.completion.catch(() => {}); // a caller that only iterates sees the error there
    call.on('data', (message: unknown) => {
      if (this.settled) return;
      let step: Step<C, F>;
      try {
        step = convert(message);
      } catch (err) {
        this.fail(err);
        call.cancel();
        return;
      }
      if ('final' in step) this.finish(step.final);
      else this.push(step.chunk);
    });
    call.on('error', (err: unknown) => this.fail(toError(err)));
    call.on('end', () => this.fail(new InternalError(grpcStatus.INTERNAL, 'stream ended without a final message')));
    if (signal) {
      if (signal.aborted) this.stop();
      else signal.addEventListener('abort', this.onAbort, { once: true });
    }
  }

  /** STOP: cancel the call; the completion holds exactly the chunks handed out so far. */
  stop(): void {
    if (this.settled) return;
    this.call.cancel();
    let result: F;
    try {
      result = this.afterStop(this.delivered);
    } catch (err) {
      this.fail(err);
      return;
    }
    this.queue.length = 0;
    this.finish(result);
  }

  [Symbol.asyncIterator](): AsyncIterator<C> {
    return {
      next: () => this.next(),
      return: async (): Promise<IteratorResult<C>> => {
        this.stop();
        return { done: true, value: undefined };
      },
    };
  }

  private next(): Promise<IteratorResult<C>> {
    const chunk = this.queue.shift();
    if (chunk !== undefined) return Promise.resolve(this.hand(chunk));
    if (this.failure !== null) return Promise.reject(this.failure);
    if (this.ended) return Promise.resolve({ done: true, value: undefined });
    return new Promise<IteratorResult<C>>((resolve, reject) => {
      this.waiting = resolve;
      this.failWaiting = reject;
    });
  }

  private hand(chunk: C): IteratorResult<C> {
    this.delivered.push(chunk);
    return { done: false, value: chunk };
  }

  private push(chunk: C): void {
    const waiting = this.waiting;
    if (waiting) {
      this.waiting = this.failWaiting = null;
      waiting(this.hand(chunk));
    } else {
      this.queue.push(chunk);
    }
  }

  private finish(result: F): void {
    if (this.settled) return;
    this.settled = this.ended = true;
    this.signal?.removeEventListener('abort', this.onAbort);
    this.resolve(result);
    const waiting = this.waiting;
    this.waiting = this.failWaiting = null;
    waiting?.({ done: true, value: undefined });
  }

  private fail(err: unknown): void {
    if (this.settled) return;
    this.settled = this.ended = true;
    this.failure = err;
    this.signal?.removeEventListener('abort', this.onAbort);
    this.reject(err);
    const failWaiting = this.failWaiting;
    this.waiting = this.failWaiting = null;
    failWaiting?.(err);
  }
}
