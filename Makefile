# Ambient mesh: operator, control plane, ztunnel, waypoint.
# Kubebuilder-shaped targets; every tool is a pinned Go tool (hack/tools/go.mod)
# built into bin/, so nothing needs a global install.

IMG ?= ambient/manager:dev
TAG ?= dev
VERSION ?= 0.1.0
K8S_VERSION ?= 1.36.3
BIN := $(CURDIR)/bin
ENVTEST_ASSETS := $(BIN)/k8s/$(K8S_VERSION)
GO_TEST_FLAGS ?= -count=1
export KUBEBUILDER_ASSETS := $(ENVTEST_ASSETS)
export PATH := $(BIN):$(PATH)

CONTROLLER_GEN := $(BIN)/controller-gen
KUSTOMIZE := $(BIN)/kustomize
PROTOC_GEN_GO := $(BIN)/protoc-gen-go

.PHONY: all
all: build

##@ General
.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"} /^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-16s\033[0m %s\n", $$1, $$2 } /^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development
.PHONY: tools
tools: $(CONTROLLER_GEN) $(KUSTOMIZE) $(PROTOC_GEN_GO) ## Build the pinned Go tools into bin/.
$(CONTROLLER_GEN) $(KUSTOMIZE) $(PROTOC_GEN_GO) &: hack/tools/go.mod hack/tools/go.sum
	cd hack/tools && GOBIN=$(BIN) go install tool

.PHONY: manifests
manifests: $(CONTROLLER_GEN) ## Generate CRDs, RBAC and webhook manifests.
	$(CONTROLLER_GEN) rbac:roleName=manager-role crd webhook paths="./api/..." paths="./controllers/..." output:crd:artifacts:config=config/crd/bases

.PHONY: generate
generate: $(CONTROLLER_GEN) ## Generate deepcopy code, protobuf code and the API reference.
	$(CONTROLLER_GEN) object:headerFile="hack/boilerplate.go.txt" paths="./api/..."
	@if [ -x hack/gen-proto.sh ]; then hack/gen-proto.sh; fi
	go run ./hack/apidocs -dir api/v1alpha1 > docs/api-reference.md

.PHONY: gen-check
gen-check: manifests generate bundle mod-check ## Fail when generated code or manifests are stale.
	@git diff --exit-code -- api config docs/api-reference.md bundle proxylib controllers || \
		{ echo "generated files are stale: run 'make manifests generate bundle' and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- api config bundle proxylib controllers)" || \
		{ git status --porcelain -- api config bundle proxylib controllers; echo "untracked generated files"; exit 1; }

.PHONY: mod-check
mod-check: ## Fail when this module, or a test module that replaces it by ../.., is not tidy.
	@go mod tidy -diff >/dev/null || { echo "go.mod is not tidy: run 'go mod tidy' and commit"; exit 1; }
	@# Test modules break on a clean clone when this module's requirements
	@# change and theirs are not tidied with it.
	@for m in $$(git grep -l 'ambientmesh/ambient => ' -- '*/go.mod' | xargs -n1 dirname); do \
		(cd $$m && go mod tidy -diff >/dev/null) || { echo "$$m/go.mod is not tidy (the main module's requirements changed): run 'cd $$m && go mod tidy' and commit"; exit 1; }; \
	done

.PHONY: fmt
fmt: ## Run go fmt.
	go fmt ./...

.PHONY: vet
vet: ## Run go vet.
	go vet ./...

.PHONY: envtest
envtest: ## Build kube-apiserver and etcd for envtest into bin/ (once; cached).
	hack/build-envtest.sh kube-apiserver etcd

.PHONY: test
test: manifests generate bundle mod-check fmt vet envtest test-unit test-foreign-arch fuzz e2e ## The whole suite: generate, unit, envtest, network-namespace tests, a fuzz smoke and the lab end-to-end tests.

.PHONY: test-unit
test-unit: envtest $(KUSTOMIZE) ## Unit, envtest and network-namespace tests (namespaced tests need root).
	go test $(GO_TEST_FLAGS) ./...
	@if [ -f test/interop/go.mod ]; then cd test/interop && go test $(GO_TEST_FLAGS) ./...; fi
	cd test/observability && go test $(GO_TEST_FLAGS) ./...

# The images are built for amd64 and arm64; the data path's portable packages
# are also tested built for the architecture this machine is not, under
# qemu-user-static (.ci/run installs it). Left out: packages that need what
# qemu's user mode does not translate (netfilter netlink, SO_MARK, namespace
# ioctls: inpod, netnsutil, redirect, meshtransport, the netns suites).
FOREIGN_ARCH := $(if $(filter arm64,$(shell go env GOARCH)),amd64,arm64)
QEMU_amd64 := qemu-x86_64-static
QEMU_arm64 := qemu-aarch64-static
FOREIGN_PKGS ?= ./proxylib/hbone/ ./proxylib/hbone/h2/ ./proxylib/hbone/h3/ ./proxylib/hbone/fallback/ \
	./proxylib/authz/... ./proxylib/identity/... ./proxylib/discovery/... ./proxylib/l7/ ./proxylib/lb/ \
	./proxylib/dnsproxy/ ./proxylib/grpcwire/ ./proxylib/ca/ ./proxylib/caclient/
.PHONY: test-foreign-arch
test-foreign-arch: ## The data path's portable tests built for the other image architecture (arm64 here) and run under qemu-user-static.
	@command -v $(QEMU_$(FOREIGN_ARCH)) >/dev/null || { echo "$(QEMU_$(FOREIGN_ARCH)) missing: apt-get install qemu-user-static"; exit 1; }
	GOARCH=$(FOREIGN_ARCH) go test $(GO_TEST_FLAGS) -exec $(QEMU_$(FOREIGN_ARCH)) $(FOREIGN_PKGS)

.PHONY: test-operator
test-operator: manifests envtest ## Only the operator's packages (fast inner loop).
	go test $(GO_TEST_FLAGS) ./controllers/ ./controllers/webhookcert/ ./cmd/manager/ ./api/... ./hack/...

.PHONY: fuzz
fuzz: envtest ## Run every fuzz target for FUZZTIME each (default 10s, 2 targets at a time with one worker each: the smoke make test runs; a budget shorter than the seed corpus' baseline run fails with "context deadline exceeded" on a loaded machine).
	FUZZ_JOBS=$(or $(FUZZ_JOBS),2) FUZZ_PARALLEL=$(or $(FUZZ_PARALLEL),1) hack/fuzz.sh $(or $(FUZZTIME),10s)

FUZZTIME_LONG ?= 10m
.PHONY: fuzz-long
fuzz-long: SHELL := /bin/bash
fuzz-long: envtest ## Every fuzz target for FUZZTIME (default 10m) each, FUZZ_JOBS at a time (default 1); log and summary in bin/fuzz/ (not in CI).
	@mkdir -p $(BIN)/fuzz
	set -o pipefail; hack/fuzz.sh $(or $(FUZZTIME),$(FUZZTIME_LONG)) 2>&1 | tee $(BIN)/fuzz/fuzz-long.log

.PHONY: bench
bench: build ## Benchmarks with same-run baselines (results go to docs/performance.md by hand).
	@if [ -x hack/bench.sh ]; then hack/bench.sh; else echo "hack/bench.sh not present yet"; fi

.PHONY: bench-ztunnel
bench-ztunnel: ## Two real ztunnels in network namespaces against direct TCP and two relay floors (Go mTLS, socat+OpenSSL), same run (PERF lines; ZTUNNEL_PERF_SECONDS, ZTUNNEL_PROFILE).
	ZTUNNEL_PERF=1 go test -count=1 -timeout 15m -run 'TestPerf$$' -v ./test/ztunnel/ | grep --line-buffered -E 'PERF|^(---|ok|FAIL)'

KWOK_VERSION ?= v0.8.0
SCALE_TEST ?= TestScaleSmoke
SCALE_TIMEOUT ?= 60m
KWOK := $(BIN)/kwok
$(KWOK): ## kwok (simulated nodes) from the Go module proxy, pinned.
	GOBIN=$(BIN) go install sigs.k8s.io/kwok/cmd/kwok@$(KWOK_VERSION)

.PHONY: scale
scale: envtest $(KWOK) ## Control plane against a kwok-simulated cluster with node-scoped xDS clients (SCALE_NODES, SCALE_PODS_PER_NODE; prints RESULT lines). SCALE_TEST=TestScaleScenarios runs the scenarios (see test/scale/scenarios_test.go).
	KWOK_VERSION=$(KWOK_VERSION) go test -tags scale -count=1 -run $(SCALE_TEST) -v -timeout $(SCALE_TIMEOUT) ./test/scale/ | grep --line-buffered -E 'RESULT|^(---|ok|FAIL)|_test.go:[0-9]+: [^R]'

.PHONY: bench-mesh
bench-mesh: ## fortio through the lab mesh: direct vs ztunnel vs ztunnel+waypoint, same and cross node (bin/bench-mesh/).
	BENCH_MESH=full E2E_RUN='^TestBenchMesh$$' E2E_REQUIRE_MESH=1 test/lab/e2e.sh

##@ Build
LDFLAGS := -s -w -X main.version=$(TAG)

.PHONY: build
build: ## Build every binary into bin/ (static).
	CGO_ENABLED=0 go build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/ ./cmd/...

.PHONY: build-manager
build-manager: ## Build only the operator.
	CGO_ENABLED=0 go build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN)/manager ./cmd/manager

.PHONY: run
run: manifests generate ## Run the manager against the current kubeconfig (CRDs via make install; no webhooks).
	go run ./cmd/manager --enable-webhooks=false --controlplane=false --log-development

# Images: one OCI index per cmd for PLATFORMS (cross-compiled, CGO off),
# named $(REGISTRY)/<name>:$(TAG). PLATFORMS=host builds only the build
# machine's architecture (the lab's fast path).
REGISTRY ?= docker.io/ambient
PLATFORMS ?= linux/amd64,linux/arm64

.PHONY: images
images: ## Multi-arch OCI indexes (no Docker needed): bin/images/oci, digests in bin/images/images.json, host-arch <name>.tar for ctr/kind.
	go run ./hack/images -tag $(TAG) -registry $(REGISTRY) -platforms $(PLATFORMS) -out $(BIN)/images -bin $(BIN) -sysroot $(BIN)/sysroot -build

.PHONY: push
push: ## Push the indexes of the last `make images` to REGISTRY (go-containerregistry; credentials from ~/.docker/config.json).
	go run ./hack/images -push -tag $(TAG) -registry $(REGISTRY) -out $(BIN)/images

.PHONY: release
release: manifests $(KUSTOMIZE) images ## Images for PLATFORMS, then dist/install.yaml and dist/bundle/ pinned to their digests (push them with make push).
	go run ./hack/release -images $(BIN)/images/images.json -kustomize $(KUSTOMIZE) -out dist/install.yaml
	go run ./hack/bundle -version $(VERSION) -images $(BIN)/images/images.json -kustomize $(KUSTOMIZE) -out dist

##@ Deployment
.PHONY: install
install: manifests $(KUSTOMIZE) ## Install CRDs into the cluster of the current kubeconfig.
	$(KUSTOMIZE) build config/crd | kubectl apply --server-side -f -

.PHONY: uninstall
uninstall: manifests $(KUSTOMIZE) ## Remove the CRDs.
	$(KUSTOMIZE) build config/crd | kubectl delete --ignore-not-found -f -

# render-installer writes the operator's manifests with image IMG to
# dist/install.yaml, through a throw-away overlay (config/ stays untouched).
.PHONY: build-installer
build-installer: manifests $(KUSTOMIZE) ## Write dist/install.yaml (CRDs, RBAC, webhook, operator with IMG).
	rm -rf dist/overlay && mkdir -p dist/overlay
	printf 'resources:\n- ../../config/default\n' > dist/overlay/kustomization.yaml
	cd dist/overlay && $(KUSTOMIZE) edit set image ambient/manager=$(IMG)
	$(KUSTOMIZE) build dist/overlay > dist/install.yaml
	rm -rf dist/overlay
	@echo "wrote dist/install.yaml (image $(IMG))"

.PHONY: deploy
deploy: build-installer ## Deploy the operator with image IMG to the current kubeconfig's cluster.
	kubectl apply --server-side -f dist/install.yaml

.PHONY: undeploy
undeploy: build-installer ## Remove the operator (delete AmbientMesh first to release pods).
	kubectl delete --ignore-not-found -f dist/install.yaml

.PHONY: bundle
bundle: manifests $(KUSTOMIZE) ## Write the OLM bundle (bundle/, bundle.Dockerfile).
	go run ./hack/bundle -version $(VERSION) -img $(IMG) -kustomize $(KUSTOMIZE)

##@ Lab
.PHONY: lab-up
lab-up: ## Bring up the multi-node lab cluster.
	test/lab/lab.sh up

.PHONY: lab-down
lab-down: ## Tear the lab down completely.
	test/lab/lab.sh down

.PHONY: demo
demo: ## The main job: bring up the lab and replay the ambient journey (falls back to demo-local).
	@if [ -x test/lab/demo.sh ]; then test/lab/demo.sh; else $(MAKE) demo-local; fi

.PHONY: demo-local
demo-local: envtest ## Operator only: local API server, the manager, the sample AmbientMesh and what it produced.
	hack/demo-local.sh

.PHONY: e2e
e2e: ## End-to-end suite in the lab.
	test/lab/e2e.sh

.PHONY: e2e-flannel
e2e-flannel: ## The journey's core on a third worker whose pod network is flannel (vxlan, kube subnet manager; built from the module proxy into bin/flannel).
	LAB_WORKERS=3 LAB_FLANNEL_NODES=w3 E2E_REQUIRE_FLANNEL=1 E2E_REQUIRE_MESH=1 E2E_TAGS=e2e,flannel \
	  E2E_RUN='^(TestLabNodesReady|TestSameAndCrossNodeWithoutMesh|TestFlannelWorkerJourney)$$' test/lab/e2e.sh

.PHONY: chaos
chaos: ## Faults under steady load in the lab (manager down 2 min, ztunnel SIGKILL, waypoint replica deleted and SIGKILLed, kube-apiserver and etcd restarts, node agent killed mid-capture, workers partitioned 10 s, CA away past half a cert lifetime); bin/chaos/ (make e2e runs a short one). CHAOS_SCENARIOS=regexp picks scenarios.
	CHAOS=full E2E_RUN='^TestChaos$$' E2E_REQUIRE_MESH=1 test/lab/e2e.sh

.PHONY: root-rotation
root-rotation: ## Root-CA rotation under traffic in the lab, trigger to old root removed (~15 min; make e2e runs it to the switch).
	ROOT_ROTATION=full E2E_RUN='^TestRootRotationUnderTraffic$$' E2E_REQUIRE_MESH=1 test/lab/e2e.sh

DURATION ?= 30m
.PHONY: soak
soak: ## Steady load with policy changes and pod churn for DURATION (default 30m) in the lab; bin/soak/ (make e2e runs 40 s).
	SOAK_DURATION=$(DURATION) E2E_RUN='^TestSoak$$' E2E_REQUIRE_MESH=1 E2E_TIMEOUT=$(or $(E2E_TIMEOUT),3h) test/lab/e2e.sh

.PHONY: conformance
conformance: ## Upstream Gateway API conformance (GatewayHTTP profile, class istio) in the lab; report in docs/conformance/.
	test/lab/conformance.sh

.PHONY: conformance-mesh
conformance-mesh: ## Upstream Gateway API conformance, MESH-HTTP profile (GAMMA), in the lab; report in docs/conformance/.
	test/lab/conformance-mesh.sh
