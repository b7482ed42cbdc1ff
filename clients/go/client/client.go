// Package client streams completions from a llama-crab server through the stubs that
// protoc-gen-go and protoc-gen-go-grpc generate from protos/llama_crab/v1/llama_crab.proto
// (clients/go/build.sh puts them at the import path llamacrab/gen/v1).
package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"strings"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"

	pb "llamacrab/gen/v1"
)

// Complete streams the completion of req. onChunk gets each chunk as it arrives; when it
// returns false the call is stopped by cancelling its context, and the result is the
// Completion of exactly the delivered chunks with STOP_REASON_CANCELLED (as the Python
// and Node clients return). Otherwise the result is the server's final Completion.
// A refused request is a gRPC status error (see Describe).
func Complete(ctx context.Context, c pb.LlamaCrabServiceClient, req *pb.CompleteRequest, onChunk func(*pb.Chunk) bool) (*pb.Completion, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := c.Complete(ctx, req)
	if err != nil {
		return nil, err
	}
	var chunks []*pb.Chunk
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return nil, errors.New("llama-crab: stream ended without a final Completion")
		}
		if err != nil {
			return nil, err
		}
		switch r := resp.Response.(type) {
		case *pb.CompleteResponse_Completion:
			return r.Completion, nil
		case *pb.CompleteResponse_Chunk:
			chunks = append(chunks, r.Chunk)
			if !onChunk(r.Chunk) {
				cancel() // the server frees the slot within one decode step
				return Delivered(chunks, req.GetOptions().Logprobs != nil), nil
			}
		}
	}
}

// Delivered is the Completion of a stream stopped by the caller: the chunks' text and
// tokens joined, STOP_REASON_CANCELLED, and the prompt's length from the first chunk
// (the only one that carries it).
func Delivered(chunks []*pb.Chunk, logprobsRequested bool) *pb.Completion {
	var text strings.Builder
	done := &pb.Completion{StopReason: pb.StopReason_STOP_REASON_CANCELLED, Usage: &pb.Usage{}, HasLogprobs: logprobsRequested}
	for _, c := range chunks {
		text.WriteString(c.Text)
		done.TokenIds = append(done.TokenIds, c.TokenIds...)
		if logprobsRequested {
			done.Logprobs = append(done.Logprobs, c.Logprobs...)
		}
	}
	done.Text = text.String()
	done.Usage.CompletionTokens = int32(len(done.TokenIds))
	if len(chunks) > 0 {
		done.Usage.PromptTokens = chunks[0].PromptTokens
	}
	return done
}

// Describe renders an error of Complete: the gRPC code and message, and for
// INVALID_ARGUMENT the fields that google.rpc.BadRequest names.
func Describe(err error) string {
	s, ok := status.FromError(err)
	if !ok {
		return err.Error()
	}
	out := fmt.Sprintf("%s: %s", s.Code(), s.Message())
	for _, d := range s.Details() {
		if br, ok := d.(*errdetails.BadRequest); ok {
			for _, v := range br.GetFieldViolations() {
				out += fmt.Sprintf(" [field %s: %s]", v.GetField(), v.GetDescription())
			}
		}
	}
	return out
}
