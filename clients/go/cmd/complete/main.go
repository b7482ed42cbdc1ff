// Command complete streams a completion from a llama-crab server:
//
//	complete [-server HOST:PORT] [-max-tokens N] [-stop-after N] [-json] PROMPT
//
// Chunks' text goes to stdout as it arrives; the final Completion's stop reason and
// token counts go to stderr. -stop-after N stops the stream by cancelling its context
// after N chunks (the result then says STOP_REASON_CANCELLED). -json writes every
// message (chunks, then the completion) as one protojson line on stdout instead.
// -server defaults to $LLAMA_CRAB_SERVER, else localhost:50051; -token to
// $LLAMA_CRAB_TOKEN. Exit status: 0 done, 1 the server refused or failed, 2 usage,
// 130 interrupted.
package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/signal"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"

	"llamacrab/client"
	pb "llamacrab/gen/v1"
)

func main() {
	server := flag.String("server", envOr("LLAMA_CRAB_SERVER", "localhost:50051"), "server address HOST:PORT")
	maxTokens := flag.Int("max-tokens", 16, "maximum number of tokens to generate")
	stopAfter := flag.Int("stop-after", 0, "stop (cancel) after this many chunks; 0 never")
	ignoreEOS := flag.Bool("ignore-eos", false, "never end at an end-of-generation token")
	token := flag.String("token", os.Getenv("LLAMA_CRAB_TOKEN"), "bearer token")
	timeout := flag.Duration("timeout", 0, "deadline of the call, e.g. 30s; 0 none")
	asJSON := flag.Bool("json", false, "write each message as a JSON line")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: %s [flags] PROMPT\n", os.Args[0])
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() != 1 {
		flag.Usage()
		os.Exit(2)
	}

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	if *token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+*token)
	}

	// Plaintext, as `llama-crab serve` without --tls-cert. (grpc.WithInsecure: the
	// Debian grpc-go 1.33 predates credentials/insecure.)
	conn, err := grpc.Dial(*server, grpc.WithInsecure())
	if err != nil {
		fail(1, "%s: %v", *server, err)
	}
	defer conn.Close()

	req := &pb.CompleteRequest{
		Prompt:  &pb.CompleteRequest_Text{Text: flag.Arg(0)},
		Options: &pb.CompletionOptions{MaxTokens: proto.Int32(int32(*maxTokens))},
	}
	if *ignoreEOS {
		req.Options.IgnoreEos = proto.Bool(true)
	}
	chunks := 0
	done, err := client.Complete(ctx, pb.NewLlamaCrabServiceClient(conn), req, func(c *pb.Chunk) bool {
		chunks++
		if *asJSON {
			writeJSON(&pb.CompleteResponse{Response: &pb.CompleteResponse_Chunk{Chunk: c}})
		} else {
			os.Stdout.WriteString(c.Text)
		}
		return *stopAfter <= 0 || chunks < *stopAfter
	})
	if err != nil {
		if ctx.Err() == context.Canceled {
			fail(130, "interrupted")
		}
		fail(1, "%s", client.Describe(err))
	}
	if *asJSON {
		writeJSON(&pb.CompleteResponse{Response: &pb.CompleteResponse_Completion{Completion: done}})
	} else {
		fmt.Println()
	}
	u := done.GetUsage()
	fmt.Fprintf(os.Stderr, "stop_reason=%s prompt_tokens=%d completion_tokens=%d cached_tokens=%d chunks=%d\n",
		done.StopReason, u.GetPromptTokens(), u.GetCompletionTokens(), u.GetCachedTokens(), chunks)
}

var jsonOptions = protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}

func writeJSON(m *pb.CompleteResponse) {
	b, err := jsonOptions.Marshal(m)
	if err != nil {
		fail(1, "json: %v", err)
	}
	os.Stdout.Write(append(b, '\n'))
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

func fail(code int, format string, args ...interface{}) {
	fmt.Fprintf(os.Stderr, "complete: "+format+"\n", args...)
	os.Exit(code)
}
