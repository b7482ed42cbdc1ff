// Errors as typed classes, one per gRPC status the service uses; `field` names the first
// offending request field (from the google.rpc.BadRequest in the rich error trailer).

import { BinaryReader } from '@bufbuild/protobuf/wire';
import { Metadata, status as grpcStatus, type ServiceError } from '@grpc/grpc-js';

export interface FieldViolation {
  field: string;
  description: string;
}

/** An RPC failure: `status` is the gRPC status name, `violations` the request fields at fault. */
export class LlamaCrabError extends Error {
  readonly code: number;
  readonly status: string;
  readonly violations: FieldViolation[];

  constructor(code: number, message: string, violations: FieldViolation[] = []) {
    super(message);
    this.name = new.target.name;
    this.code = code;
    this.status = grpcStatus[code] ?? 'UNKNOWN';
    this.violations = violations;
  }

  /** The first offending field, when the server named one. */
  get field(): string | null {
    return this.violations.length ? this.violations[0].field : null;
  }
}

/** A request field is invalid (bad option, bad grammar, empty or too-long prompt). */
export class InvalidArgumentError extends LlamaCrabError {}
/** The server's wait queue is full; retry later. */
export class ResourceExhaustedError extends LlamaCrabError {}
/** The server is starting, draining or unreachable. */
export class UnavailableError extends LlamaCrabError {}
/** The call's deadline passed. */
export class DeadlineExceededError extends LlamaCrabError {}
/** A bearer token was needed and missing or wrong. */
export class UnauthenticatedError extends LlamaCrabError {}
/** The call was cancelled (by the server, or a proxy). */
export class CancelledError extends LlamaCrabError {}
/** The server failed (an engine error, or a stream that ended without its final message). */
export class InternalError extends LlamaCrabError {}

const BY_CODE: Record<number, new (code: number, message: string, violations?: FieldViolation[]) => LlamaCrabError> = {
  [grpcStatus.INVALID_ARGUMENT]: InvalidArgumentError,
  [grpcStatus.RESOURCE_EXHAUSTED]: ResourceExhaustedError,
  [grpcStatus.UNAVAILABLE]: UnavailableError,
  [grpcStatus.DEADLINE_EXCEEDED]: DeadlineExceededError,
  [grpcStatus.UNAUTHENTICATED]: UnauthenticatedError,
  [grpcStatus.CANCELLED]: CancelledError,
  [grpcStatus.INTERNAL]: InternalError,
};

/** The typed error for a status code. */
export function errorFor(code: number, message: string, violations: FieldViolation[] = []): LlamaCrabError {
  const Kind = BY_CODE[code] ?? LlamaCrabError;
  return new Kind(code, message, violations);
}

const BAD_REQUEST_URL = 'type.googleapis.com/google.rpc.BadRequest';

// google.rpc.Status {code = 1, message = 2, repeated Any details = 3}, Any {type_url = 1,
// value = 2}, BadRequest {repeated FieldViolation field_violations = 1}, FieldViolation
// {field = 1, description = 2}: read by field number, so no google.rpc code is generated.
function fields(bytes: Uint8Array, each: (field: number, reader: BinaryReader) => void): void {
  const reader = new BinaryReader(bytes);
  while (reader.pos < reader.len) {
    const [field, wireType] = reader.tag();
    const before = reader.pos;
    each(field, reader);
    if (reader.pos === before) reader.skip(wireType, field);
  }
}

/** The field violations of a rich error trailer (grpc-status-details-bin). */
export function fieldViolations(metadata: Metadata | undefined): FieldViolation[] {
  const out: FieldViolation[] = [];
  for (const value of metadata?.get('grpc-status-details-bin') ?? []) {
    try {
      fields(Buffer.isBuffer(value) ? value : Buffer.from(String(value)), (field, r) => {
        if (field !== 3) return;
        let url = '';
        let detail: Uint8Array = new Uint8Array();
        fields(r.bytes(), (f, d) => {
          if (f === 1) url = d.string();
          else if (f === 2) detail = d.bytes();
        });
        if (url !== BAD_REQUEST_URL) return;
        fields(detail, (f, d) => {
          if (f !== 1) return;
          const v: FieldViolation = { field: '', description: '' };
          fields(d.bytes(), (g, e) => {
            if (g === 1) v.field = e.string();
            else if (g === 2) v.description = e.string();
          });
          out.push(v);
        });
      });
    } catch {
      // A malformed trailer: the status code alone still tells the kind of error.
    }
  }
  return out;
}

export function toError(err: unknown): LlamaCrabError {
  if (err instanceof LlamaCrabError) return err;
  const e = err as Partial<ServiceError>;
  if (typeof e.code === 'number') return errorFor(e.code, e.details || e.message || 'RPC failed', fieldViolations(e.metadata));
  return new LlamaCrabError(grpcStatus.UNKNOWN, err instanceof Error ? err.message : String(err));
}
